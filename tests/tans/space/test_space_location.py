from tans.space.store import space_location
from tans.storage import Storage


def test_a_bare_space_name_is_a_run_of_the_jobs_root(tmp_path):
    st = Storage(str(tmp_path))
    assert space_location("local-s1", st) == str(tmp_path / "spaces" / "local-s1")
    assert space_location("", st) == st.uri  # the root's LATEST
    assert space_location("s3://b/r/spaces/x", st) == "s3://b/r/spaces/x"
    assert space_location(str(tmp_path / "other"), st) == str(tmp_path / "other")
