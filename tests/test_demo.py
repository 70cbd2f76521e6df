"""`smtpdup demo` as a user meets it: start it, send with swaks, find the copies."""

import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from conftest import START_TIMEOUT, WAIT_TIMEOUT, free_port, wait_until

SWAKS = shutil.which("swaks")


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(SWAKS is None, reason="swaks is not installed (.ci/run installs it: apt-get install swaks)")
def test_demo_receives_a_message_from_swaks_and_stores_both_copies(tmp_path):
    port = free_port()
    mail = tmp_path / "demo-mail"
    output_path = tmp_path / "demo.out"
    # The user's environment and working directory do not configure the demo.
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SMTP_DUP_")}
    environ.update(SMTP_DUP_BOGUS="1", SMTP_DUP_RELAY_DESTINATION_PRIMARY="127.0.0.1:1")
    (tmp_path / "config.yaml").write_text("relay: [broken\n")
    with open(output_path, "wb") as output:
        demo = subprocess.Popen(
            [sys.executable, "-m", "smtpdup", "demo", "--dir", str(mail), "--listen", f"127.0.0.1:{port}"],
            cwd=tmp_path, env=environ, stdout=output, stderr=subprocess.STDOUT,
        )
    try:
        def ready():
            assert demo.poll() is None, f"demo exited:\n{output_path.read_text()}"
            return listening(port)

        wait_until(ready, START_TIMEOUT, what="the demo to listen")
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

        printed = output_path.read_text()
        assert f"swaks --server 127.0.0.1:{port}" in printed
        assert str(mail / "primary" / "new") in printed and str(mail / "backup" / "new") in printed

        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=WAIT_TIMEOUT) == 0
        assert "Traceback" not in output_path.read_text()
    finally:
        if demo.poll() is None:
            os.kill(demo.pid, signal.SIGKILL)
            demo.wait(timeout=START_TIMEOUT)
