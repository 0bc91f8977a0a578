"""The load tool against a real server: its reports follow ghz's schema and add up."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from bench.cli import main as bench_main
from bench.config import ConfigError, Template, load_config, parse_duration
from bench.report import SCHEMA_PATH, percentile
from korero.server.app import KoreroServer

GHZ = Path(__file__).resolve().parents[2] / "bench" / "ghz"


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def _check_consistent(report: dict[str, Any]) -> None:
    codes = report["statusCodeDistribution"]
    assert report["count"] == sum(codes.values())
    assert sum(report["errorDistribution"].values()) == report["count"] - codes.get("OK", 0)
    assert len(report["details"]) == report["count"]
    assert sum(1 for d in report["details"] if d["status"] == "OK") == codes.get("OK", 0)
    lats = [d["latency"] for d in report["latencyDistribution"]]
    assert [d["percentage"] for d in report["latencyDistribution"]] == [10, 25, 50, 75, 90, 95, 99]
    assert report["fastest"] <= lats[0]
    assert lats == sorted(lats)
    assert lats[-1] <= report["slowest"]
    assert report["fastest"] <= report["average"] <= report["slowest"]
    assert report["slowest"] <= report["total"]
    hist = report["histogram"]
    assert len(hist) == 11
    assert [b["mark"] for b in hist] == sorted(b["mark"] for b in hist)
    assert sum(b["count"] for b in hist) == codes["OK"]
    assert sum(b["frequency"] for b in hist) == pytest.approx(1.0)
    assert report["rps"] == pytest.approx(report["count"] / (report["total"] / 1e9), rel=1e-6)


async def _run_cli(args: list[str]) -> int:
    return await asyncio.to_thread(bench_main, args)


async def test_chat_run_writes_a_ghz_report_and_streaming_metrics(
    server: KoreroServer, tmp_path: Path
) -> None:
    out, stream_out = tmp_path / "chat.json", tmp_path / "chat-stream.json"
    code = await _run_cli(
        [
            "run",
            "--config",
            str(GHZ / "chat.json"),
            "--host",
            server.address,
            "-n",
            "6",
            "-c",
            "3",
            "--connections",
            "2",
            "-P",
            "2",
            "--stream-interval",
            "0s",
            "-o",
            str(out),
            "--stream-output",
            str(stream_out),
            "--quiet",
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    jsonschema.validate(report, _schema())
    _check_consistent(report)
    assert report["statusCodeDistribution"] == {"OK": 6}
    assert report["endReason"] == "normal"
    assert report["options"]["call"] == "korero.chat.v1.ChatService.Chat"
    assert report["options"]["connections"] == 2

    stream = json.loads(stream_out.read_text())
    korero = stream["paths"]["korero"]
    assert korero["turns"] == 6 * 3  # three messages per conversation
    assert korero["turnErrors"] == {}  # templated client_message_ids are unique
    ttfd = korero["timeToFirstDeltaNs"]
    assert ttfd["count"] == 18
    assert 0 < ttfd["min"] <= ttfd["p50"] <= ttfd["p99"] <= ttfd["max"]
    assert korero["turnLatencyNs"]["p50"] >= ttfd["p50"]
    assert korero["deltas"] >= 18
    assert korero["textBytes"] > 0
    assert stream["versions"]["grpcio"]
    assert stream["client"]["processes"] == 2


async def test_health_and_send_message_reports(server: KoreroServer, tmp_path: Path) -> None:
    schema = _schema()
    for name, total in (("health", 40), ("send_message", 4)):
        out = tmp_path / f"{name}.json"
        code = await _run_cli(
            [
                "run",
                "--config",
                str(GHZ / f"{name}.json"),
                "--host",
                server.address,
                "-n",
                str(total),
                "-c",
                "4",
                "--connections",
                "2",
                "-P",
                "1",
                "-o",
                str(out),
                "--quiet",
            ]
        )
        assert code == 0
        report = json.loads(out.read_text())
        jsonschema.validate(report, schema)
        _check_consistent(report)
        assert report["statusCodeDistribution"] == {"OK": total}


async def test_errors_are_counted_as_ghz_does(tmp_path: Path) -> None:
    # Nothing listens on port 9 of loopback: every call fails with Unavailable.
    out = tmp_path / "down.json"
    code = await _run_cli(
        [
            "run",
            "--config",
            str(GHZ / "health.json"),
            "--host",
            "127.0.0.1:9",
            "-n",
            "4",
            "-c",
            "2",
            "--connections",
            "1",
            "-P",
            "1",
            "-t",
            "2s",
            "-o",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    jsonschema.validate(report, _schema())
    assert report["count"] == 4
    assert report["statusCodeDistribution"] == {"Unavailable": 4}
    assert sum(report["errorDistribution"].values()) == 4
    assert all(
        k.startswith("rpc error: code = Unavailable desc = ") for k in report["errorDistribution"]
    )
    assert report["latencyDistribution"] is None  # ghz: only successful calls have latencies


def test_ghz_configs_load_and_templates_render() -> None:
    cfg = load_config(GHZ / "chat.json", {"concurrency": 2, "total": 2, "connections": 1})
    assert cfg.spec.kind == "bidi"
    assert cfg.stream_interval == 0.5
    fields = {"WorkerID": "p0g1c0", "RequestNumber": 7}
    rendered = [t.render({**fields, "UUID": "u"}, random.Random(1)) for t in cfg.data_templates()]
    cmids = [m["message"]["client_message_id"] for m in rendered[1:]]
    assert all(c.startswith("p0g1c0-7-") for c in cmids)
    assert len(set(cmids)) == 3
    name = rendered[0]["start"]["metadata"]["customer_name"]
    assert name.startswith("Bench ")
    assert len(name) == len("Bench ") + 6
    assert Template.of({"a": "{{randomString 0}}"}).render({}, random.Random(1))["a"]
    with pytest.raises(ConfigError):
        load_config(None, {"call": "korero.chat.v1.ChatService.Chat", "bogus-key": 1})
    with pytest.raises(ConfigError):
        Template.of({"a": "{{.NoSuchField}}"})
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("250ms") == 0.25


def test_percentiles_use_ghzs_rank_rule() -> None:
    values = list(range(1, 11))
    assert percentile(values, 10) == 1  # 0.1*10 is whole: rank 1
    assert percentile(values, 25) == 3
    assert percentile(values, 50) == 5
    assert percentile(values, 99) == 10
