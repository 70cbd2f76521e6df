"""`smtpdup demo` as a user meets it: start it, send with swaks, find the copies."""

import shutil
import signal
import subprocess

import pytest
from conftest import WAIT_TIMEOUT, free_port, wait_until

SWAKS = shutil.which("swaks")


@pytest.mark.skipif(SWAKS is None, reason="swaks is not installed (.ci/run installs it: apt-get install swaks)")
def test_demo_receives_a_message_from_swaks_and_stores_both_copies(tmp_path, smtpdup):
    port = free_port()
    mail = tmp_path / "demo-mail"
    # The user's environment and working directory do not configure the demo.
    (tmp_path / "config.yaml").write_text("relay: [broken\n")
    demo = smtpdup({"SMTP_DUP_BOGUS": "1", "SMTP_DUP_RELAY_DESTINATION_PRIMARY": "127.0.0.1:1"},
                   ["demo", "--dir", str(mail), "--listen", f"127.0.0.1:{port}"], cwd=tmp_path).start()
    demo.wait_listening("127.0.0.1", port)
    swaks = subprocess.run(
        [SWAKS, "--server", f"127.0.0.1:{port}", "--from", "a@example.com", "--to", "b@example.com",
         "--body", "hello from swaks"],
        capture_output=True, text=True, timeout=WAIT_TIMEOUT,
    )
    assert swaks.returncode == 0, swaks.stdout + swaks.stderr

    for where in ("primary", "backup"):
        new = mail / where / "new"
        [stored] = wait_until(lambda: list(new.iterdir()) if new.is_dir() else None,
                              what=f"a message in {new}")
        content = stored.read_bytes()
        assert content.startswith(b"X-Envelope-From: <a@example.com>\r\nX-Envelope-To: <b@example.com>\r\n")
        assert b"\r\n\r\nhello from swaks\r\n" in content

    printed = demo.log()
    assert f"swaks --server 127.0.0.1:{port}" in printed
    assert str(mail / "primary" / "new") in printed and str(mail / "backup" / "new") in printed

    demo.signal(signal.SIGTERM)
    assert demo.wait(timeout=WAIT_TIMEOUT) == 0
    assert "Traceback" not in demo.log()
