#!/usr/bin/env python3
"""Checks every Switchyard node with the official grpcio health client (a peer nobody here
wrote): starts `switchyard up` on loopback, asks each node's grpc.health.v1 service, and stops
the cluster. Health must tell the truth, so the check also needs NOT_SERVING where a node cannot
serve: a worker whose coordinator is unreachable, and the router from the moment it is told to
stop (seen on a Watch stream, which must then end rather than hold the shutdown up).
Usage: check_grpc_health.py PATH/TO/switchyard CACHE_DIR"""

import re
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICES = {
    "coordinator": "switchyard.v1.CoordinatorService",
    "worker": "switchyard.v1.ExpertService",
    "router": "switchyard.v1.InferenceService",
}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def channel_to(addr, kind=None, ca=None):
    """Plaintext, or (for a coordinator or worker of a cluster on mutual TLS) TLS that trusts
    the cluster CA and checks the node's role name; health needs no client certificate."""
    if ca is None or kind == "router":
        return grpc.insecure_channel(addr)
    with open(ca, "rb") as f:
        credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
    return grpc.secure_channel(
        addr, credentials,
        options=[("grpc.ssl_target_name_override", f"{kind}.switchyard.cluster")])


def check(addr, service, kind=None, ca=None):
    with channel_to(addr, kind, ca) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_without_coordinator(binary, model):
    """A worker whose coordinator is not there: up, but holding nothing it was assigned."""
    dead = f"127.0.0.1:{free_port()}"
    w = subprocess.Popen(
        [binary, "worker", "--model", model, "--coordinator", dead, "--listen", "127.0.0.1:0",
         "--insecure-cluster"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = w.stdout.readline()
        addr = line.split()[2]
        for service in ("", SERVICES["worker"]):
            status = check(addr, service)
            assert status == NOT_SERVING, ("worker without a coordinator", service, status)
        print("grpc health: a worker with no coordinator is NOT_SERVING")
    finally:
        w.kill()
        w.wait(timeout=30)


def main():
    binary, cache = sys.argv[1], sys.argv[2]
    up = subprocess.Popen(
        [binary, "up", "--workers", "2", "--router-addr", "127.0.0.1:0", "--cache-dir", cache],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    nodes, model, ca = [], None, None
    stopped = False
    try:
        deadline = time.time() + 120
        for line in up.stderr:
            m = re.match(r"(coordinator|worker \d+|router) · pid \d+ · (127\.0\.0\.1:\d+)", line)
            if m:
                nodes.append((m.group(1).split()[0], m.group(2)))
            m = re.search(r"admin certificate (\S+)/admin\.pem", line)
            if m:
                ca = m.group(1) + "/ca.pem"
            m = re.search(r" · model (\S+)$", line.strip())
            if line.startswith("switchyard up:") and m:
                model = m.group(1)
            if line.startswith("serving"):
                break
            if time.time() > deadline:
                raise SystemExit("switchyard up did not come up in 120 s")
        assert len(nodes) == 4, nodes
        assert model, "switchyard up did not name its model"
        assert ca, "switchyard up did not say where its cluster CA is"
        for kind, addr in nodes:
            for service in ("", SERVICES[kind]):
                status = check(addr, service, kind, ca)
                assert status == SERVING, (kind, service, status)
            if kind != "router":
                # The cluster's own gRPC ports take only TLS.
                try:
                    check(addr, "")
                    raise SystemExit(f"{kind}: answered plaintext health checks")
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            try:
                check(addr, "no.such.Service", kind, ca)
                raise SystemExit(f"{kind}: unknown service reported healthy")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND, e
        print(f"grpc health: {len(nodes)} nodes SERVING (coordinator and workers over TLS)")

        worker_without_coordinator(binary, model)

        # Watch the router, then stop the cluster: it must say NOT_SERVING, then end the stream.
        router = next(addr for kind, addr in nodes if kind == "router")
        seen, ended = [], threading.Event()

        def watch():
            with grpc.insecure_channel(router) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                try:
                    for reply in stub.Watch(
                            health_pb2.HealthCheckRequest(service=SERVICES["router"]), timeout=60):
                        seen.append(reply.status)
                except grpc.RpcError:
                    pass
            ended.set()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        wait_until = time.time() + 10
        while not seen and time.time() < wait_until:
            time.sleep(0.05)
        assert seen == [SERVING], seen
        up.send_signal(signal.SIGTERM)
        stopped = True
        assert ended.wait(30), "the router's health Watch stream did not end on shutdown"
        assert NOT_SERVING in seen, f"the router never said NOT_SERVING while stopping: {seen}"
        assert up.wait(timeout=60) == 0, "switchyard up did not stop cleanly"
        print("grpc health: the router turned NOT_SERVING on SIGTERM and closed its watchers")
    finally:
        if not stopped:
            up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)


if __name__ == "__main__":
    main()
