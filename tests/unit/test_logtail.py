"""logtail: the user's lines from replica logs, for the driver's terminal (Ray's log_to_driver)."""

from __future__ import annotations

import io

import pytest

from flotilla._private.logtail import LogTail, as_text, ours


@pytest.mark.parametrize(("line", "flotillas"), [
    (b"2026-12-04 21:45:38,436 INFO replica 7776af41 [-] flotilla.replica: replica 7776af41 ready (pid 1)", True),
    (b"INFO 2026-12-04 21:45:38,120 app_Dep 7776af41 742ea2de-ac9e-ee20-4676-000000000004 -- GET /batched 200 52.2ms",
     True),
    (b"INFO 2026-12-04 21:46:43,002 app_Dep 9b591966 6b966ab4-b081-71b2-9540-000000000001 -- CALL __call__ OK 1.2ms",
     True),
    (b"INFO 2026-12-04 21:46:43,002 proxy head 6b966ab4-b081 -- /pkg.Svc/Method OK 1.2ms", True),  # gRPC
    (b"INFO 2026-12-04 21:46:43,012 app_Dep 9b591966 6b96 -- from the user's logger", False),
    (b"INFO 2026-12-04 21:46:43,012 app_Dep 9b591966 -- took 3 ms", False),
    (b"INFO 2026-12-04 21:46:43,012 app_Dep 9b591966 rid -- model took 12.3ms", False),
    (b"INFO 2026-12-04 21:46:43,012 app_Dep 9b591966 rid -- WS /ws 1000 3.1ms", True),
    (b'{"asctime": "x", "levelname": "INFO", "name": "flotilla.replica", "message": "m"}', True),
    (b'{"levelname": "INFO", "message": "a /r 200 1.00ms", "serve_access_log": true}', True),
    (b"Message: Hello bar", False),
    (b"2026-12-04 21:46:43,012 INFO replica 9b591966 [6b96] ray.serve: from the user's logger", False),
    (b'{"asctime": "x", "levelname": "INFO", "name": "ray.serve", "message": "m"}', False),
    (b"Traceback (most recent call last):", False),
])
def test_ours_tells_flotillas_lines_from_the_users(line: bytes, flotillas: bool) -> None:
    assert ours(line) is flotillas


def test_new_lines_only_whole_ones_and_only_the_users(tmp_path) -> None:
    old = tmp_path / "replica_app_Dep_aaaa1111.log"
    old.write_bytes(b"printed before the driver came\n")
    out = io.StringIO()
    tail = LogTail(str(tmp_path), out)
    with old.open("ab") as f:
        f.write(b"INFO 2026-12-04 21:45:38,001 app_Dep aaaa1111 rid -- GET /r 200 1.0ms\nhello\npart")
    new = tmp_path / "replica_my_app_My_Dep_bbbb2222.log"
    new.write_bytes(b"from a new replica\n")
    tail.poll()
    assert sorted(out.getvalue().splitlines()) == [
        "(ServeReplica:app_Dep aaaa1111) hello", "(ServeReplica:my_app_My_Dep bbbb2222) from a new replica"]
    with old.open("ab") as f:
        f.write(b"ial line\n")
    tail.poll()
    assert out.getvalue().splitlines()[-1] == "(ServeReplica:app_Dep aaaa1111) partial line"


def test_json_lines_are_shown_as_rays_text_lines() -> None:
    line = (b'{"asctime": "2026-12-05 18:52:57,216", "levelname": "INFO", "message": "hi", "request_id": "r1", '
            b'"application": "j", "deployment": "j_json_app", "replica": "hda9vjtk", "component_name": "replica"}')
    assert as_text(line) == "INFO 2026-12-05 18:52:57,216 j_json_app hda9vjtk r1 -- hi"
    assert as_text(b"{not json") == "{not json"
    assert as_text(b"plain") == "plain"
