"""Ray job entry points: `python -m jobs.<name> ...`; each `tans <command>` wraps one of them."""
