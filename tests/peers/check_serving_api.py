#!/usr/bin/env python3
"""Checks the serving API with clients nobody here wrote: the official `openai` package against
the HTTP API (completions, streaming chat, models, its error types), grpcio's reflection
client against the gRPC API (discovering and calling InferenceService without .proto files),
`jsonschema` against the expert-load endpoint and a `switchyard loadtest` report, and the
official Prometheus client's parser against every node's `/metrics`.

Starts `switchyard up` on loopback with an API key and an HTTP address, runs the checks, stops
the cluster. Usage: check_serving_api.py PATH/TO/switchyard CACHE_DIR"""

import json
import os
import re
import signal
import tempfile
import urllib.request
import subprocess
import sys
import time

import grpc
import jsonschema
import openai
from prometheus_client.parser import text_string_to_metric_families
from google.protobuf import descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

KEY = "peer-test-key"


def start(binary, cache):
    up = subprocess.Popen(
        [binary, "up", "--workers", "2", "--router-addr", "127.0.0.1:0",
         "--http-addr", "127.0.0.1:0", "--api-key", KEY, "--cache-dir", cache,
         "--served-model-name", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    grpc_addr = http_addr = None
    metrics_urls = []
    deadline = time.time() + 180
    for line in up.stderr:
        metrics_urls += re.findall(r"metrics (http://127\.0\.0\.1:\d+/metrics)", line)
        m = re.match(r"router · pid \d+ · (127\.0\.0\.1:\d+) · http (127\.0\.0\.1:\d+)", line)
        if m:
            grpc_addr, http_addr = m.group(1), m.group(2)
        if line.startswith("serving"):
            break
        if time.time() > deadline:
            raise SystemExit("switchyard up did not come up in 180 s")
    assert grpc_addr and http_addr, "the router printed no gRPC and HTTP addresses"
    assert len(metrics_urls) == 3, f"a coordinator and two workers with metrics: {metrics_urls}"
    return up, grpc_addr, http_addr, metrics_urls + [f"http://{http_addr}/metrics"]


def check_openai(http_addr):
    client = openai.OpenAI(base_url=f"http://{http_addr}/v1", api_key=KEY, max_retries=0,
                           timeout=60)
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"], models

    done = client.completions.create(model="tiny", prompt="Hello there", max_tokens=8,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 8, done.usage
    assert done.choices[0].finish_reason == "length"
    text = done.choices[0].text

    streamed = "".join(
        c.choices[0].text for c in client.completions.create(
            model="tiny", prompt="Hello there", max_tokens=8, temperature=0, stream=True,
            extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == text, (streamed, text)

    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is an expert?"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                          temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})
    content = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant"
    assert len(chat.choices[0].logprobs.content) == 10
    assert all(len(t.top_logprobs) == 2 for t in chat.choices[0].logprobs.content)
    parts, usage = [], None
    for chunk in client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
    assert "".join(parts) == content, (parts, content)
    assert usage is not None and usage.completion_tokens == 10, usage

    # logit_bias is honoured: +100 on one token forces it, and the chat logprobs' bytes are the
    # tokens' own (they concatenate to the text, even where a token is part of a character).
    def forced(token):
        return client.completions.create(model="tiny", prompt="Hello there", max_tokens=4,
                                         temperature=0, logprobs=0, logit_bias={str(token): 100},
                                         extra_body={"ignore_eos": True})
    f46, f47 = forced(46), forced(47)
    t46, t47 = f46.choices[0].logprobs.tokens, f47.choices[0].logprobs.tokens
    assert len(set(t46)) == 1 and len(set(t47)) == 1 and t46[0] != t47[0], (t46, t47)
    assert f46.id != done.id and re.fullmatch(r"cmpl-[0-9a-f]{32}", f46.id), f46.id
    banned = {str(i): -100 for i in range(16)}
    bytes_chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                                temperature=0, logprobs=True, logit_bias=banned,
                                                extra_body={"ignore_eos": True})
    joined = b"".join(bytes(t.bytes) for t in bytes_chat.choices[0].logprobs.content)
    assert joined.decode("utf-8", errors="replace") == bytes_chat.choices[0].message.content, joined

    errors = [
        (openai.BadRequestError, dict(logit_bias={"99999": 5}), "logit_bias"),
        (openai.BadRequestError, dict(extra_body={"guided_json": {"type": "object"}}), "guided_json"),
        (openai.BadRequestError, dict(suffix="}"), "suffix"),
        (openai.BadRequestError, dict(temperature=-1.0), "temperature"),
        (openai.BadRequestError, dict(top_p=1.5), "top_p"),
        (openai.BadRequestError, dict(max_tokens=10 ** 7), "max_tokens"),
        (openai.NotFoundError, dict(model="gpt-4"), "model"),
    ]
    for kind, extra, field in errors:
        args = dict(model="tiny", prompt="x", max_tokens=4)
        args.update(extra)
        try:
            client.completions.create(**args)
            raise SystemExit(f"{extra} was accepted")
        except kind as e:
            assert field in str(e), e
    for kind, extra, field in [
        (openai.BadRequestError, dict(response_format={"type": "json_object"}), "response_format"),
        (openai.BadRequestError, dict(tool_choice="required", tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
         "tool"),
    ]:
        try:
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, **extra)
            raise SystemExit(f"{extra} was accepted")
        except kind as e:
            assert field in str(e), e
    # Paths that are not endpoints say so in OpenAI's error shape, not an empty 404.
    try:
        client.embeddings.create(model="tiny", input="x")
        raise SystemExit("/v1/embeddings answered")
    except openai.NotFoundError as e:
        assert "/v1/embeddings" in e.body["message"], e.body
    assert client.models.retrieve("tiny").id == "tiny"
    bad_key = openai.OpenAI(base_url=f"http://{http_addr}/v1", api_key="wrong", max_retries=0)
    try:
        bad_key.models.list()
        raise SystemExit("a wrong key was accepted")
    except openai.AuthenticationError:
        pass
    print(f"openai {openai.__version__}: completions, streaming chat, logprobs, logit_bias, "
          "refused fields, unknown paths, errors OK")


def check_reflection(grpc_addr):
    with grpc.insecure_channel(grpc_addr) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = db.get_services()
        assert "switchyard.v1.InferenceService" in services, services
        pool = descriptor_pool.DescriptorPool(db)
        service = pool.FindServiceByName("switchyard.v1.InferenceService")
        methods = {m.name for m in service.methods}
        assert {"Generate", "GenerateUnary", "Tokenize", "ModelInfo"} <= methods, methods
        # Call Tokenize with message classes built from the reflected descriptors alone.
        request_cls = GetMessageClass(pool.FindMessageTypeByName("switchyard.v1.TokenizeRequest"))
        reply_cls = GetMessageClass(pool.FindMessageTypeByName("switchyard.v1.TokenizeResponse"))
        tokenize = channel.unary_unary(
            "/switchyard.v1.InferenceService/Tokenize",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=reply_cls.FromString)
        reply = tokenize(request_cls(text="def f(x): return x"), timeout=10,
                         metadata=[("authorization", f"Bearer {KEY}")])
        assert reply.count == len(reply.ids) > 0, reply
        try:
            tokenize(request_cls(text="x"), timeout=10)
            raise SystemExit("Tokenize without the key was accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
    print(f"grpc reflection: {len(services)} services, Tokenize called from reflected types")


def check_loadtest(binary, grpc_addr, http_addr):
    docs = os.path.join(os.path.dirname(__file__), "..", "..", "docs")
    load_schema = json.load(open(os.path.join(docs, "expert-load.schema.json")))
    report_schema = json.load(open(os.path.join(docs, "loadtest-report.schema.json")))
    for schema in (load_schema, report_schema):
        jsonschema.Draft202012Validator.check_schema(schema)
    with tempfile.TemporaryDirectory() as tmp:
        for target in (["--router", grpc_addr], ["--http", http_addr]):
            report_path = os.path.join(tmp, "report.json")
            plots = os.path.join(tmp, "plots")
            out = subprocess.run(
                [binary, "loadtest", *target, "--api-key", KEY, "--requests", "16",
                 "--concurrency", "4", "--prompt-len", "8:32", "--output-len", "4:12",
                 "--report", report_path, "--plot", plots, "--quiet"],
                capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stderr
            assert "expert utilisation" in out.stdout, out.stdout
            report = json.load(open(report_path))
            jsonschema.validate(report, report_schema)
            assert report["requests"]["ok"] == 16, report["requests"]
            fed = sum(r["prompt_tokens"] + r["output_tokens"] - 1 for r in report["per_request"])
            util = report["expert_utilisation"]
            for layer, counts in zip(util["layers"], util["counts"]):
                assert layer["tokens"] == fed, (layer, fed)
                assert sum(counts) == fed * util["top_k"]
            for name in ("expert_heatmap.svg", "worker_tokens.svg", "latency_cdf.svg"):
                svg = open(os.path.join(plots, name)).read()
                assert svg.startswith("<svg") and "<rect" in svg, name
    req = urllib.request.Request(f"http://{http_addr}/v1/expert_load",
                                 headers={"authorization": f"Bearer {KEY}"})
    load = json.load(urllib.request.urlopen(req, timeout=10))
    jsonschema.validate(load, load_schema)
    print("loadtest: gRPC and HTTP runs add up; report and expert load match their schemas")


def check_metrics(urls):
    expected = {
        "switchyard_coordinator_workers", "switchyard_coordinator_live_version",
        "switchyard_worker_tokens", "switchyard_worker_queue_wait_seconds",
        "switchyard_requests", "switchyard_time_to_first_token_seconds",
        "switchyard_expert_load_imbalance", "switchyard_dispatch_layer_seconds",
    }
    seen = set()
    for url in urls:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        families = list(text_string_to_metric_families(text))
        assert families, url
        for f in families:
            assert f.name.startswith("switchyard_"), f.name
            seen.add(f.name)
    missing = expected - seen
    assert not missing, f"missing metric families {missing}; saw {sorted(seen)}"
    print(f"prometheus: {len(urls)} nodes, {len(seen)} metric families parse")
    check_dashboard(seen)


def check_dashboard(seen):
    """Every metric the Grafana dashboard (deploy/grafana/switchyard.json) queries is one the
    nodes export, so the dashboard cannot drift from the metrics."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "grafana",
                        "switchyard.json")
    with open(path) as f:
        dashboard = json.load(f)
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"switchyard_[a-z0-9_]+", target["expr"]):
                used.add(re.sub(r"_(total|bucket|count|sum)$", "", name))
    unknown = used - seen
    assert not unknown, f"the dashboard queries metrics no node exports: {sorted(unknown)}"
    print(f"grafana: {len(dashboard['panels'])} panels, {len(used)} metrics, all exported")


def check_tls(binary, cache):
    """The client APIs over TLS (`--tls-cert`, from `switchyard certs --api-name`): the openai
    client trusting only the issuing CA, the grpcio health client over TLS, and a plaintext
    request getting no answer."""
    try:  # the HTTP client the openai package is built on
        import httpx
    except ImportError:
        import httpx2 as httpx
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with tempfile.TemporaryDirectory() as certs:
        subprocess.run([binary, "certs", "--out", certs, "--api-name", "127.0.0.1",
                        "--api-name", "localhost"], check=True, capture_output=True)
        up = subprocess.Popen(
            [binary, "up", "--workers", "1", "--router-addr", "127.0.0.1:0",
             "--http-addr", "127.0.0.1:0", "--cache-dir", cache, "--served-model-name", "tiny",
             "--tls-cert", f"{certs}/api.pem", "--tls-key", f"{certs}/api.key"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            grpc_addr = http_addr = None
            for line in up.stderr:
                m = re.match(r"router · pid \d+ · (127\.0\.0\.1:\d+) · http (127\.0\.0\.1:\d+)",
                             line)
                if m:
                    grpc_addr, http_addr = m.group(1), m.group(2)
                if line.startswith("serving"):
                    break
            assert http_addr, "the TLS router printed no HTTP address"
            client = openai.OpenAI(base_url=f"https://{http_addr}/v1", api_key="unused",
                                   max_retries=0, timeout=60,
                                   http_client=httpx.Client(verify=f"{certs}/ca.pem"))
            assert [m.id for m in client.models.list().data] == ["tiny"]
            done = client.completions.create(model="tiny", prompt="Hello", max_tokens=4,
                                             temperature=0, extra_body={"ignore_eos": True})
            assert done.usage.completion_tokens == 4, done.usage
            try:
                urllib.request.urlopen(f"http://{http_addr}/v1/models", timeout=10).read()
                raise SystemExit("the TLS router answered plaintext HTTP")
            except SystemExit:
                raise
            except Exception:
                pass
            with open(f"{certs}/ca.pem", "rb") as f:
                credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
            with grpc.secure_channel(grpc_addr, credentials) as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=10).status
                assert status == health_pb2.HealthCheckResponse.SERVING, status
            print("tls: the openai client (HTTPS, trusting only the issuing CA) and grpcio "
                  "(gRPC over TLS) served; plaintext refused")
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=60)


def main():
    binary, cache = sys.argv[1], sys.argv[2]
    up, grpc_addr, http_addr, metrics_urls = start(binary, cache)
    try:
        check_openai(http_addr)
        check_reflection(grpc_addr)
        check_loadtest(binary, grpc_addr, http_addr)
        check_metrics(metrics_urls)
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
    check_tls(binary, cache)


if __name__ == "__main__":
    main()
