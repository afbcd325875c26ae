"""Simulation: recorded decisions replayed against a candidate with a known set of flips."""

from __future__ import annotations

from tests.policy.conftest import ARR, client, order, trade
from trustplane.app import Services
from trustplane.authzen.model import Decision, DecisionRequest, Entity
from trustplane.policy.bundle import BundleSource, compile_bundle, default_bundle
from trustplane.policy.simulate import simulate


def candidate() -> BundleSource:
    """Tighter on large tickets (5m instead of 10m), and residency waived for reports."""
    files = dict(default_bundle().files)
    files["trading.cedar"] = files["trading.cedar"].replace("1000000000", "500000000")
    files["reports.cedar"] = (
        '@id("report.view_anywhere")\npermit (principal, action == Action::"report:view", resource)'
        "\nwhen { resource.owner == principal.legal_entity };\n"
    )
    files["trading.cedar"] = files["trading.cedar"].replace(
        'forbid (principal, action in Action::"business", resource)\nunless',
        'forbid (principal, action in Action::"business", resource)\nunless '
        '{ action == Action::"report:view" } unless',
    )
    tests = files["tests/default.yaml"].replace(
        "reasons: [mandate.amount_limit]",
        "reasons: [mandate.amount_limit, order.large_ticket_approval]",
    )
    head, _, tail = tests.partition("name: a report whose data lives in a served region")
    tail = tail.replace("reasons: [entity.own]", "reasons: [entity.own, report.view_anywhere]", 1)
    files["tests/default.yaml"] = head + "name: a report whose data lives in a served region" + tail
    return BundleSource(files)


REPORT = Entity("Report", "rep-1", {"owner": client().parents[0]})


async def record(services: Services) -> dict[str, Decision]:
    engine = services.policy.engine
    report_ctx = {"delegation_depth": 0}
    requests = {
        "small": DecisionRequest(client(), "order:create", order(), trade(amount_minor=100)),
        "7m": DecisionRequest(
            client(), "order:create", order("o7"), trade(amount_minor=700_000_000)
        ),
        "8m": DecisionRequest(
            client(), "order:create", order("o8"), trade(amount_minor=800_000_000)
        ),
        "12m": DecisionRequest(
            client(), "order:create", order("o12"), trade(amount_minor=1_200_000_000)
        ),
        "foreign": DecisionRequest(client("arr-oms", ARR), "order:create", order(), trade()),
        "report_us": DecisionRequest(
            client(), "report:view", REPORT, {**report_ctx, "data_region": "us"}
        ),
        "export_us": DecisionRequest(
            client(), "report:export", REPORT, {**report_ctx, "data_region": "us"}
        ),
        "report_eu": DecisionRequest(
            client(), "report:view", REPORT, {**report_ctx, "data_region": "eu"}
        ),
    }
    decisions = await engine.decide_many(list(requests.values()))
    return dict(zip(requests, decisions, strict=True))


async def test_known_flips_are_reported_exactly(services: Services) -> None:
    recorded = await record(services)
    assert recorded["7m"].allowed
    assert recorded["8m"].allowed
    assert not recorded["report_us"].allowed
    compiled = compile_bundle(candidate())
    report = await simulate(services.db, compiled)
    data = report.to_dict()
    assert (data["total"], data["replayed"], data["skipped"]) == (8, 8, 0)
    assert data["flips"] == {"allow_to_deny": 2, "deny_to_allow": 1}
    assert data["by_reason"] == {
        "allow_to_deny": {"order.large_ticket_approval": 2},
        "deny_to_allow": {"entity.own": 1, "report.view_anywhere": 1},
    }
    flipped = {ex["decision_id"] for k in data["examples"] for ex in data["examples"][k]}
    assert flipped == {recorded[k].decision_id for k in ("7m", "8m", "report_us")}
    assert data["unchanged"] == 5
    # report_eu: still allowed, now by two permits
    assert data["reasons_changed"] == 1
    assert report.exceeds(max_flips=2, max_flip_rate=None)
    assert not report.exceeds(max_flips=3, max_flip_rate=None)
    assert report.exceeds(max_flips=None, max_flip_rate=0.3)
    assert not report.exceeds(max_flips=None, max_flip_rate=0.4)


async def test_the_active_bundle_replays_without_flips(services: Services) -> None:
    await record(services)
    report = await simulate(services.db, compile_bundle(default_bundle()))
    assert (report.replayed, report.flip_count, report.reasons_changed) == (8, 0, 0)


async def test_since_limits_the_replay(services: Services) -> None:
    recorded = await record(services)
    assert recorded
    import time

    report = await simulate(
        services.db, compile_bundle(candidate()), since_ms=time.time_ns() // 1_000_000 + 60_000
    )
    assert report.total == 0
    assert report.flip_rate == 0.0


async def test_requests_that_never_reached_the_engine_are_skipped(services: Services) -> None:
    await services.policy.engine.decide(client(), "order:create", order(), {"bad": 1.5})
    report = await simulate(services.db, compile_bundle(candidate()))
    assert (report.total, report.skipped, report.replayed) == (1, 1, 0)


async def test_worker_processes_give_the_same_report(services: Services) -> None:
    for _ in range(3):
        await record(services)
    compiled = compile_bundle(candidate())
    one = (await simulate(services.db, compiled)).to_dict()
    two = (await simulate(services.db, compiled, workers=2)).to_dict()
    for key in ("total", "replayed", "unchanged", "reasons_changed", "flips", "by_reason"):
        assert one[key] == two[key], key
    assert one["flips"] == {"allow_to_deny": 6, "deny_to_allow": 3}
    assert len(two["examples"]["allow_to_deny"]) == 5


async def test_retention_prunes_old_decision_inputs_only(services: Services) -> None:
    import time

    from trustplane.audit.sink import recent_events

    await record(services)
    now = time.time_ns() // 1_000_000
    assert await services.policy.prune(now) == 0
    ninety_one_days = 91 * 86_400_000
    assert await services.policy.prune(now + ninety_one_days) == 8
    report = await simulate(services.db, compile_bundle(candidate()))
    assert report.total == 0
    assert len(await recent_events(services.db, 50, "policy:decision:allowed")) == 4
