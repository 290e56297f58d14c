"""Exec probe: exit 0 if the coordinator's gRPC health service answers SERVING, else 1.

Usage: python coordinator_health.py [--service NAME] HOST:PORT CA_PEM

The kubelet's own `grpc:` probe dials plaintext (Kubernetes 1.37 adds `mode: TLS`, which
skips verification), and the coordinator's client port is TLS only. So this asks the
standard health service (public there: METHOD_ACCESS in coordinator/trust/auth.py) over
TLS, verifying the coordinator against its own CA. Kept to the standard library, grpcio and
grpcio-health-checking, which the polyarch environment in the image has.

Without --service it asks for the process ("" status): SERVING on the active coordinator
and on a standby alike, so a liveness check or compose's healthcheck never fails a standby.
`--service polyarch.v1.BuildService` is SERVING on the active coordinator only: a readiness
check that puts just the active one behind a Service or load balancer.
"""

import argparse

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

parser = argparse.ArgumentParser(description="Check a polyarch coordinator's gRPC health.")
parser.add_argument("address", metavar="HOST:PORT", help="the coordinator's client port")
parser.add_argument("ca_file", metavar="CA_PEM", help="the CA its server certificate chains to")
parser.add_argument(
    "--service", default="", metavar="NAME",
    help='the gRPC service to ask about (default "": the process)',
)  # fmt: skip
args = parser.parse_args()
try:
    with open(args.ca_file, "rb") as ca:
        credentials = grpc.ssl_channel_credentials(ca.read())
except OSError as exc:
    parser.exit(1, f"cannot read the CA file {args.ca_file}: {exc.strerror}\n")
with grpc.secure_channel(args.address, credentials) as channel:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=args.service), timeout=5
        )
    except grpc.RpcError as exc:
        parser.exit(1, f"health check failed: {exc.code().name}: {exc.details()}\n")
if reply.status != health_pb2.HealthCheckResponse.SERVING:
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    parser.exit(1, f"health of {args.service or 'the process'}: {status}\n")
