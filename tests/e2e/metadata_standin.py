"""A throwaway stand-in for the appliance's metadata service, for checking an OS image by
hand (tests/e2e/check_os_image.py): a NoCloud seed, EC2-style metadata and a phone-home
receiver for one machine, every request logged as a JSON line. Not part of the product:
the appliance serves these itself (appliance/web/metadata.py).

    python -m tests.e2e.metadata_standin --bind 10.250.40.1 --port 8080 \\
        --log requests.jsonl --user-data user-data --public-key key.pub \\
        --instance-id i-1 --hostname node1

Paths answered (any seed token, any EC2 version such as 2009-04-04, 2021-03-23, latest):
``/nocloud/<token>/{meta-data,user-data,vendor-data}``, ``/<version>/meta-data/...``
(ami-id, instance-id, instance-type, local-hostname, hostname, local-ipv4,
placement/availability-zone, public-keys/0/openssh-key), ``/<version>/user-data``,
``/<version>/dynamic/instance-identity/document``, ``PUT /latest/api/token`` (IMDSv2),
``POST /phone-home/<token>`` (recorded with its form fields).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

IMDS_TOKEN = "standin-imds-token"


class Standin:
    def __init__(self, log: Path, user_data: str, public_key: str, instance_id: str,
                 hostname: str) -> None:
        self.log_path = log
        self.user_data = user_data
        self.public_key = public_key
        self.instance_id = instance_id
        self.hostname = hostname
        self.lock = threading.Lock()

    def log(self, event: dict[str, Any]) -> None:
        event["t"] = round(time.time(), 3)
        with self.lock, self.log_path.open("a") as f:
            f.write(json.dumps(event) + "\n")

    def meta_data(self) -> str:
        return f"instance-id: {self.instance_id}\nlocal-hostname: {self.hostname}\n"

    def ec2_tree(self, client: str) -> dict[str, Any]:
        return {
            "ami-id": "ami-standin", "instance-id": self.instance_id,
            "instance-type": "bare-metal", "local-hostname": self.hostname,
            "hostname": self.hostname, "local-ipv4": client,
            "placement": {"availability-zone": "standin"},
            "public-keys": {"0=appliance": {"openssh-key": self.public_key + "\n"}},
        }


def handler_for(s: Standin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, fmt: str, *args: Any) -> None:  # JSON log instead
            pass

        def send(self, code: int, body: str, event: dict[str, Any] | None = None) -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            s.log({"client": self.client_address[0], "method": self.command,
                   "path": self.path, "status": code,
                   "ua": self.headers.get("User-Agent"),
                   "imds_token": self.headers.get("X-aws-ec2-metadata-token"),
                   **(event or {})})

        def body(self) -> str:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n).decode(errors="replace") if n else ""

        def do_GET(self) -> None:  # noqa: N802
            parts = [p for p in urllib.parse.urlsplit(self.path).path.split("/") if p]
            if len(parts) == 3 and parts[0] == "nocloud":
                files = {"meta-data": s.meta_data(), "user-data": s.user_data,
                         "vendor-data": "#cloud-config\n{}\n"}
                if parts[2] in files:
                    return self.send(200, files[parts[2]])
                return self.send(404, "not found\n")
            if len(parts) >= 2 and parts[1] == "user-data":
                return self.send(200, s.user_data)
            if len(parts) >= 2 and parts[1] == "dynamic":
                if parts[2:] == ["instance-identity", "document"]:
                    return self.send(200, json.dumps({
                        "instanceId": s.instance_id, "region": "standin-1",
                        "availabilityZone": "standin"}))
                return self.send(404, "not found\n")
            if len(parts) >= 2 and parts[1] == "meta-data":
                node: Any = s.ec2_tree(self.client_address[0])
                for p in parts[2:]:
                    if p.isdigit() and isinstance(node, dict):  # public-keys/0/...
                        node = next((v for k, v in node.items() if k.split("=")[0] == p),
                                    None)
                    elif isinstance(node, dict) and p in node:
                        node = node[p]
                    else:
                        return self.send(404, "not found\n")
                    if node is None:
                        return self.send(404, "not found\n")
                if isinstance(node, dict):
                    if parts[2:] == ["public-keys"]:
                        return self.send(200, "\n".join(node))
                    return self.send(200, "\n".join(
                        k + ("/" if isinstance(v, dict) else "") for k, v in node.items()))
                return self.send(200, node)
            if len(parts) == 1:  # /<version>
                return self.send(200, "meta-data\nuser-data\ndynamic\n")
            return self.send(404, "not found\n")

        def do_PUT(self) -> None:  # noqa: N802
            self.body()
            if urllib.parse.urlsplit(self.path).path == "/latest/api/token":
                return self.send(200, IMDS_TOKEN)
            return self.send(404, "not found\n")

        def do_POST(self) -> None:  # noqa: N802
            body = self.body()
            path = urllib.parse.urlsplit(self.path).path
            if path.startswith("/phone-home/"):
                fields = {k: v[0] for k, v in urllib.parse.parse_qs(body).items()}
                return self.send(200, "ok\n", {"event": "phone-home", "fields": fields})
            return self.send(404, "not found\n", {"body": body[:2000]})

    return Handler


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bind", required=True)
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--log", type=Path, required=True)
    ap.add_argument("--user-data", type=Path, required=True)
    ap.add_argument("--public-key", type=Path, required=True)
    ap.add_argument("--instance-id", default="i-standin")
    ap.add_argument("--hostname", default="standin")
    a = ap.parse_args()
    s = Standin(a.log, a.user_data.read_text(), a.public_key.read_text().strip(),
                a.instance_id, a.hostname)
    s.log({"event": "start", "bind": a.bind, "port": a.port})
    ThreadingHTTPServer((a.bind, a.port), handler_for(s)).serve_forever()


if __name__ == "__main__":
    main()
