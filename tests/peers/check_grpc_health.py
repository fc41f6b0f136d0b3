#!/usr/bin/env python3
"""Checks every Switchyard node with the official grpcio health client (a peer nobody here
wrote): starts `switchyard up` on loopback, asks each node's grpc.health.v1 service, and stops
the cluster. Usage: grpc_health.py PATH/TO/switchyard CACHE_DIR"""

import re
import signal
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICES = {
    "coordinator": "switchyard.v1.CoordinatorService",
    "worker": "switchyard.v1.ExpertService",
    "router": "switchyard.v1.InferenceService",
}


def main():
    binary, cache = sys.argv[1], sys.argv[2]
    up = subprocess.Popen(
        [binary, "up", "--workers", "2", "--router-addr", "127.0.0.1:0", "--cache-dir", cache],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    nodes = []
    try:
        deadline = time.time() + 120
        for line in up.stderr:
            m = re.match(r"(coordinator|worker \d+|router) · pid \d+ · (127\.0\.0\.1:\d+)", line)
            if m:
                nodes.append((m.group(1).split()[0], m.group(2)))
            if line.startswith("serving"):
                break
            if time.time() > deadline:
                raise SystemExit("switchyard up did not come up in 120 s")
        assert len(nodes) == 4, nodes
        for kind, addr in nodes:
            with grpc.insecure_channel(addr) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                for service in ("", SERVICES[kind]):
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING, (kind, service, reply)
                try:
                    stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
                    raise SystemExit(f"{kind}: unknown service reported healthy")
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.NOT_FOUND, e
        print(f"grpc health: {len(nodes)} nodes SERVING")
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)


if __name__ == "__main__":
    main()
