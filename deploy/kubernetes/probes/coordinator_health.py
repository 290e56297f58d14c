"""Exec probe: exit 0 if the coordinator's gRPC health service answers SERVING, else 1.

Usage: python coordinator_health.py HOST:PORT CA_PEM

The kubelet's own `grpc:` probe dials plaintext (Kubernetes 1.37 adds `mode: TLS`, which
skips verification), and the coordinator's client port is TLS only. So this asks the
standard health service (public there: METHOD_ACCESS in coordinator/trust/auth.py) over
TLS, verifying the coordinator against its own CA. Kept to the standard library, grpcio and
grpcio-health-checking, which the polyarch environment in the image has.
"""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

address, ca_file = sys.argv[1], sys.argv[2]
with open(ca_file, "rb") as ca:
    credentials = grpc.ssl_channel_credentials(ca.read())
with grpc.secure_channel(address, credentials) as channel:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    except grpc.RpcError as exc:
        sys.exit(f"health check failed: {exc.code().name}: {exc.details()}")
if reply.status != health_pb2.HealthCheckResponse.SERVING:
    sys.exit(f"health: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
