"""Real servers for the remote-data tests, started and stopped by the tests themselves.

`FileServer`: Python's own `http.server` serving a folder, recording every request, and able to
misbehave the way networks do: cut a transfer halfway (the connection closes after part of the
body) or answer 404 or 403. `S3Server`: moto in server mode, an S3-compatible endpoint on a local port.
"""

from __future__ import annotations

import functools
import http.server
import logging
import os
import threading
from pathlib import Path


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test reads `server.requests`, not stderr
        pass

    def do_GET(self):  # noqa: N802 - http.server's naming
        owner: FileServer = self.server.owner
        name = self.path.lstrip("/")
        with owner.lock:
            owner.requests.append(name)
            cuts = owner.cut.get(name, 0)
            if cuts:
                owner.cut[name] = cuts - 1
        if name in owner.missing or name in owner.forbidden:
            self.send_error(404 if name in owner.missing else 403)
            return
        if cuts:
            data = (Path(self.directory) / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


class FileServer:
    """`with FileServer(folder) as server:` serves `folder` at `server.url`."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.requests: list[str] = []
        self.cut: dict[str, int] = {}  # file -> how many more transfers of it to cut halfway
        self.missing: set[str] = set()  # files answered with 404
        self.forbidden: set[str] = set()  # files answered with 403
        self.lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> "FileServer":
        handler = functools.partial(_Handler, directory=str(self.directory))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.owner = self
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"  # kept after stop(): the test names it
        threading.Thread(target=self._server.serve_forever, name="test-http-server", daemon=True).start()
        return self

    def count(self, name: str) -> int:
        with self.lock:
            return self.requests.count(name)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FileServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class S3Server:
    """moto's S3 in server mode on a free local port; `upload(folder, bucket, prefix)` fills it."""

    KEY, SECRET, REGION = "testing", "testing", "us-east-1"

    def __enter__(self) -> "S3Server":
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop()

    @property
    def storage_options(self) -> dict:
        return {"key": self.KEY, "secret": self.SECRET, "endpoint_url": self.endpoint,
                "client_kwargs": {"region_name": self.REGION}}

    def upload(self, folder: Path, bucket: str, prefix: str) -> str:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.KEY,
                              aws_secret_access_key=self.SECRET, region_name=self.REGION)
        client.create_bucket(Bucket=bucket)
        for path in sorted(Path(folder).iterdir()):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
        return f"s3://{bucket}/{prefix}"


def without_aws_credentials(env: dict | None = None) -> dict:
    """A copy of the environment in which boto finds no credentials at all (no variables, files or metadata)."""
    env = dict(os.environ if env is None else env)
    for key in [k for k in env if k.startswith("AWS_")]:
        del env[key]
    env.update({"AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull,
                "AWS_EC2_METADATA_DISABLED": "true"})
    return env
