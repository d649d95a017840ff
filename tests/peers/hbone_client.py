#!/usr/bin/python3
"""A foreign HBONE client for weft's end-to-end tests: TLS (Python's ssl, OpenSSL) and
HTTP/2 (hyper-h2), written without weft's code, so the tunnel is tested against a peer
someone else wrote.

It connects to an agent's tunnel port, proves the identity in --cert/--key (or none),
asks for the server identity --sni, sends `CONNECT --target` with `forwarded:
for=--source`, and on 200 writes --send through the stream and reads what comes back.
It prints one JSON object: the stage reached ("tls", "h2", "answer"), the status and
x-weft-reason of the answer, the bytes read back, or the error.
"""

import argparse
import json
import socket
import ssl
import sys

import h2.config
import h2.connection
import h2.events


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--connect", required=True, help="HOST:PORT of the tunnel listener")
    p.add_argument("--sni", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--target", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--send", default="")
    p.add_argument("--timeout", type=float, default=5.0)
    a = p.parse_args()
    out = {"stage": "tcp"}

    def done(**kw):
        out.update(kw)
        print(json.dumps(out))
        sys.exit(0)

    host, port = a.connect.rsplit(":", 1)
    try:
        sock = socket.create_connection((host, int(port)), timeout=a.timeout)
    except OSError as e:
        done(error=f"connect: {e}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(a.ca)
    if a.cert:
        ctx.load_cert_chain(a.cert, a.key)
    ctx.set_alpn_protocols(["h2"])
    out["stage"] = "tls"
    try:
        tls = ctx.wrap_socket(sock, server_hostname=a.sni)
    except (OSError, ssl.SSLError) as e:
        done(error=f"handshake: {e}")
    out["tls_version"] = tls.version()
    out["alpn"] = tls.selected_alpn_protocol()
    out["stage"] = "h2"
    # hyper-h2 4.1 wants :path on every request, also on CONNECT (RFC 9113 8.5 says no).
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
    )
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(
        sid,
        [
            (":method", "CONNECT"),
            (":authority", a.target),
            ("forwarded", f"for={a.source}"),
        ],
    )
    status, reason, body, ended = None, None, b"", False
    sent = False
    try:
        tls.sendall(conn.data_to_send())
        while not ended:
            data = tls.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    h = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v for k, v in ev.headers}
                    status = int(h.get(":status", "0"))
                    reason = h.get("x-weft-reason")
                    if status != 200:
                        ended = True
                    elif a.send and not sent:
                        conn.send_data(sid, a.send.encode().decode("unicode_escape").encode())
                        sent = True
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    ended = True
            tls.sendall(conn.data_to_send())
    except (OSError, ssl.SSLError) as e:
        if status is None:
            done(error=f"{type(e).__name__}: {e}")
    out["stage"] = "answer"
    done(status=status, reason=reason, body=body.decode("latin-1"))


if __name__ == "__main__":
    main()
