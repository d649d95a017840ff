"""An OTLP/HTTP trace receiver: decodes each export with the OpenTelemetry project's own
protobuf bindings (the `opentelemetry-proto` package from PyPI) and appends one JSON line
per span to a file, so a test can check what an exporter sent.
Usage: otlp_receiver.py ADDRESS PORT OUT_FILE"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Receiver(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        status = 200
        try:
            req = ExportTraceServiceRequest()
            req.ParseFromString(body)
            lines = []
            for rs in req.resource_spans:
                resource = {a.key: value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        lines.append(
                            json.dumps(
                                {
                                    "path": self.path,
                                    "resource": resource,
                                    "scope": ss.scope.name,
                                    "trace_id": s.trace_id.hex(),
                                    "span_id": s.span_id.hex(),
                                    "parent_span_id": s.parent_span_id.hex(),
                                    "name": s.name,
                                    "kind": s.kind,
                                    "status": s.status.code,
                                    "attributes": {a.key: value(a.value) for a in s.attributes},
                                }
                            )
                        )
            with open(OUT, "a") as f:
                for line in lines:
                    f.write(line + "\n")
        except Exception as e:  # a malformed export is the exporter's bug: say so
            sys.stderr.write(f"bad export: {e}\n")
            status = 400
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(status)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    OUT = sys.argv[3]
    ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Receiver).serve_forever()
