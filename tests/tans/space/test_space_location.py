from tans.space.store import space_location
from tans.storage import Storage


def test_a_bare_space_name_is_a_run_of_the_jobs_root(tmp_path):
    st = Storage(str(tmp_path))
    assert space_location("local-s1", st) == str(tmp_path / "spaces" / "local-s1")
    assert space_location("", st) == st.uri  # the root's LATEST
    assert space_location("s3://b/r/spaces/x", st) == "s3://b/r/spaces/x"
    assert space_location(str(tmp_path / "other"), st) == str(tmp_path / "other")


def test_space_root_is_the_storage_root_above_a_space_uri(tmp_path):
    from tans.space.store import space_root_uri

    assert space_root_uri(str(tmp_path / "spaces" / "local")) == str(tmp_path)
    assert space_root_uri("s3://bucket/team/root/spaces/local-s1") == "s3://bucket/team/root"
    # a root whose own path holds "spaces": only the last /spaces/<run> is the space's
    assert space_root_uri("/data/spaces/root/spaces/run") == "/data/spaces/root"
    assert space_root_uri("") is None
    assert space_root_uri("memory") is None
