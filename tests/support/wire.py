"""A leaf speaking the BranchKey v1 protocol by hand: plain `requests`, `pika` and
`websockets`, exactly as `docs/protocol.md` describes, independent of our
own client."""

from __future__ import annotations

import base64
import hashlib
import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import requests
from websockets.sync.client import connect as ws_connect

from .bkserver import BkServer

V2_METADATA = "{'key1':'value1', 'key2':'value2'}"


def headers(creds: dict[str, str], *, leaf_header: bool = True) -> dict[str, str]:
    result = {"Authorization": f"Bearer {creds['id']}:{creds['session_token']}", "accept": "application/json"}
    if leaf_header:
        result["LEAF"] = "true"
    return result


def digest_header(path: Path) -> str:
    return "sha256=" + base64.b64encode(hashlib.sha256(path.read_bytes()).digest()).decode()


def upload(
    server: BkServer,
    creds: dict[str, str],
    path: Path,
    *,
    v3: bool = True,
    extra_headers: dict[str, str] | None = None,
    metadata: Any = None,
) -> requests.Response:
    """POST an archive as the 2.x (no integrity headers, Python-looking metadata) or 3.x client does."""
    h = headers(creds, leaf_header=v3)
    if v3:
        h["x-bk-file-size"] = str(path.stat().st_size)
        h["x-bk-file-digest"] = digest_header(path)
        meta = (metadata if metadata is not None
                else json.dumps({"client_version": "3.0.1", "kind": "federated_learning"}))
    else:
        meta = metadata if metadata is not None else V2_METADATA
    h.update(extra_headers or {})
    with open(path, "rb") as handle:
        return requests.post(f"{server.url}/api/v1/file/upload", headers=h, timeout=120,
                             files={"file": handle},
                             data={"data": json.dumps({"leaf_name": creds["name"], "metadata": meta})})


def file_id_of(response: requests.Response) -> str:
    assert response.status_code == 201, response.text
    return response.json()["data"]["file_id"]


def download_url(server: BkServer, creds: dict[str, str], file_id: str) -> requests.Response:
    h = headers(creds)
    h["accept"] = "*/*"
    return requests.get(f"{server.url}/api/v1/file/download/{file_id}", headers=h, timeout=30)


def download(server: BkServer, creds: dict[str, str], file_id: str, dest: Path) -> Path:
    """Both steps of a download; step two carries no auth headers at all."""
    response = download_url(server, creds, file_id)
    assert response.status_code == 200, response.text
    data = requests.get(response.json()["data"]["download_url"], timeout=60)
    assert data.status_code == 200 and data.content, data.text
    dest.write_bytes(data.content)
    return dest


def send_metrics(server: BkServer, creds: dict[str, str], aggregation_id: str, metrics: dict, mode: str = "test",
                 headers_extra: dict[str, str] | None = None, **overrides: str) -> requests.Response:
    """POST metrics as the official clients do: a JSON text body without a Content-Type."""
    body = {"mode": mode, "aggregation_id": aggregation_id, "leaf_id": creds["id"], "branch_id": creds["branch_id"],
            "tree_id": creds["tree_id"], "data": json.dumps(metrics)} | overrides
    return requests.post(f"{server.url}/api/v1/performance/analysis", headers=headers(creds) | (headers_extra or {}),
                         data=json.dumps(body), timeout=30)


def run_details(server: BkServer, creds: dict[str, str], branch_id: str | None = None) -> requests.Response:
    return requests.get(f"{server.url}/api/v1/run/{branch_id or creds['branch_id']}", headers=headers(creds),
                        timeout=30)


class WsListener:
    """A 3.x-style WebSocket consumer: ticket, connect, collect text frames on a thread."""

    def __init__(self, server: BkServer, creds: dict[str, str]) -> None:
        ticket = requests.post(f"{server.url}/api/v1/ws/ticket", headers=headers(creds), timeout=30)
        assert ticket.status_code == 200, ticket.text
        data = ticket.json()["data"]
        self.url = f"ws://127.0.0.1:{server.port}/api/v1/ws?ticket={data['ticket_id']}&request_id={data['request_id']}"
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self._ws = ws_connect(self.url, open_timeout=10)
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        try:
            for text in self._ws:
                self.messages.put(json.loads(text))
        except Exception:
            return

    def next(self, message_type: str, timeout: float = 30) -> dict[str, Any]:
        while True:
            message = self.messages.get(timeout=timeout)
            if message["message_type"] == message_type:
                return message["body"]

    def close(self) -> None:
        self._ws.close()
        self._thread.join(timeout=5)


class AmqpListener:
    """A 2.x-style AMQP consumer: the leaf's own user on its tree's vhost, its durable queue, manual acks."""

    def __init__(self, creds: dict[str, str]) -> None:
        params = pika.ConnectionParameters(
            host="127.0.0.1", port=5672, virtual_host=creds["tree_id"],
            credentials=pika.PlainCredentials(creds["id"], creds["session_token"]), heartbeat=30,
            client_properties={"connection_name": f"leaf-{creds['id']}"},
        )
        self.connection = pika.BlockingConnection(params)
        self.channel = self.connection.channel()
        self.queue = creds["id"]

    def next(self, message_type: str, timeout: float = 30) -> dict[str, Any]:
        for method, properties, body in self.channel.consume(self.queue, inactivity_timeout=timeout):
            if method is None:
                raise TimeoutError(f"no {message_type} notification within {timeout} s")
            self.channel.basic_ack(method.delivery_tag)
            message = json.loads(body)
            assert properties.delivery_mode == 2, "notifications must be persistent"
            if message["message_type"] == message_type:
                return message["body"]
        raise TimeoutError("consumer ended")

    def close(self) -> None:
        try:
            self.channel.cancel()
            self.connection.close()
        except pika.exceptions.AMQPError:
            pass


def chunked_multipart(path: Path, leaf_name: str, chunk: int = 1 << 20) -> tuple[str, Iterator[bytes]]:
    """A multipart body generated from a file in chunks, so the test client never holds it whole."""
    boundary = "bkboundary7d9f1e"

    def body() -> Iterator[bytes]:
        data = json.dumps({"leaf_name": leaf_name, "metadata": V2_METADATA})
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\n{data}\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n"
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                yield block
        yield f"\r\n--{boundary}--\r\n".encode()

    return f"multipart/form-data; boundary={boundary}", body()
