"""A gRPC server and client from the gRPC project's Python library (grpcio), for testing
GRPCRoutes against a gRPC stack weft did not write. No generated code: the methods take
and return raw bytes.

  grpc_peer.py serve PORT NAME     answers weft.test.Echo/Who and /Other with NAME
  grpc_peer.py call ADDR METHOD N  calls weft.test.Echo/METHOD N times; prints one JSON
                                   line per call: {"ok": NAME} or {"code": STATUS}
"""

import json
import sys
from concurrent import futures

import grpc

SERVICE = "weft.test.Echo"


def serve(port, name):
    def answer(request, context):
        return name.encode()

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            m: grpc.unary_unary_rpc_method_handler(answer)
            for m in ("Who", "Other")
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    print(f"serving {SERVICE} on {port} as {name}", flush=True)
    server.wait_for_termination()


def call(addr, method, n):
    with grpc.insecure_channel(addr) as channel:
        rpc = channel.unary_unary(f"/{SERVICE}/{method}")
        for _ in range(n):
            try:
                print(json.dumps({"ok": rpc(b"", timeout=5).decode()}), flush=True)
            except grpc.RpcError as e:
                print(json.dumps({"code": e.code().name}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), sys.argv[3])
    elif sys.argv[1] == "call":
        call(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(__doc__)
