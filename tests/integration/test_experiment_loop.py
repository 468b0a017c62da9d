"""An experiment through a real worker, Kafka and Redis (issue 17): two arms, users split by
the worker's hash; each user's first event gets a list; the site then echoes that list's
rec_id on clicks and purchases on a known schedule, and reports impressions for some lists.
The worker's per-arm counters, and `streamrec report` reading its /metrics, must be what the
schedule implies."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from workerkit import ROOT, consume_until, produce, read_all, wait_for

from stream.experiments import parse_experiment, variance_group
from stream.records import ClickEvent, ImpressionEvent, PurchaseEvent, decode_recommendation, encode

EXPERIMENT = {
    "experiment": "it-loop",
    "control": "control",
    "arms": [{"name": "control", "share": 0.5, "baseline": "popularity"},
             {"name": "treatment", "share": 0.5, "weights": {"covisit": 2.0}}],
}
N_USERS = 24
PRICE = 10.0


def test_per_arm_counters_and_the_report_match_the_schedule(workers, worker_env, topic_prefix, tmp_path):
    bootstrap = worker_env["STREAMREC_KAFKA_BOOTSTRAP"]
    variants_file = tmp_path / "variants.json"
    variants_file.write_text(json.dumps(EXPERIMENT))
    experiment = parse_experiment(EXPERIMENT)
    worker = workers(metrics=True, STREAMREC_VARIANTS=str(variants_file))
    wait_for(lambda: worker.http("/readyz")[0] == 200, 90, "the worker ready", worker)

    users = [f"exp-u{i}" for i in range(N_USERS)]
    now = int(time.time() * 1000)
    triggers = [ClickEvent(event_id=f"t-{u}", user_id=u, item_id=f"item-{i % 5}", ts=now + i)
                for i, u in enumerate(users)]
    produce(bootstrap, topic_prefix, [("clicks", ev.user_id.encode(), encode(ev)) for ev in triggers])

    def first_lists(values):
        recs = [decode_recommendation(v) for v in values if v is not None]
        return {r.user_id: r for r in recs if r.trigger_event_id.startswith("t-")}

    lists = first_lists(consume_until(bootstrap, f"{topic_prefix}recommendations",
                                      lambda vs: len(first_lists(vs)) == N_USERS, 60, worker))
    for u, rec in lists.items():
        assert rec.variant == experiment.arm_of(u).name and rec.rec_id

    # the schedule: even users click twice on their list (echoing its rec_id), every fourth buys
    # from it, odd users click an item no list holds (credited to nothing); the site reports the
    # lists it showed: the clicked ones and every third user's
    records, expected = [], {arm.name: dict.fromkeys(("clicked_lists", "clicks", "purchased_lists", "purchases",
                                                       "revenue", "impressions"), 0) for arm in experiment.arms}
    groups: dict[tuple[str, str, str], float] = {}  # (arm, group, field) -> the count of its users' lists

    def count(arm: str, user: str, name: str, n: float = 1) -> None:
        key = (arm, str(variance_group(user)), name)
        groups[key] = groups.get(key, 0) + n
    for i, u in enumerate(users):
        rec, want = lists[u], expected[lists[u].variant]
        ts = now + 1000 + i
        if i % 2 == 0:
            for j in range(2):
                ev = ClickEvent(event_id=f"c{j}-{u}", user_id=u, item_id=f"clicked-{i}-{j}", ts=ts + j, rec_id=rec.rec_id)
                records.append(("clicks", u.encode(), encode(ev)))
            want["clicked_lists"] += 1
            want["clicks"] += 2
            count(rec.variant, u, "clicked_lists")
        else:
            ev = ClickEvent(event_id=f"c-{u}", user_id=u, item_id=f"nowhere-{i}", ts=ts)
            records.append(("clicks", u.encode(), encode(ev)))
        if i % 4 == 0:
            ev = PurchaseEvent(event_id=f"p-{u}", user_id=u, item_id=f"bought-{i}", ts=ts + 5, price=PRICE,
                               rec_id=rec.rec_id)
            records.append(("purchases", u.encode(), encode(ev)))
            want["purchased_lists"] += 1
            want["purchases"] += 1
            want["revenue"] += PRICE
            count(rec.variant, u, "purchased_lists")
            count(rec.variant, u, "revenue", PRICE)
        if i % 2 == 0 or i % 3 == 0:  # a list clicked was shown; some were shown and not clicked
            shown = ImpressionEvent(rec_id=rec.rec_id, user_id=u, item_ids=[it.item_id for it in rec.items[:5]], ts=ts)
            records.append(("impressions", u.encode(), encode(shown)))
            want["impressions"] += 1
            count(rec.variant, u, "impressions")
    produce(bootstrap, topic_prefix, records)

    def counters() -> dict[str, dict[str, float]]:
        return {arm: {name: worker.metric(f"streamrec_experiment_{name}_total", variant=arm) for name in want}
                for arm, want in expected.items()}

    wait_for(lambda: counters() == expected, 60, f"the per-arm counters {expected}", worker)
    assert all(expected[a]["clicks"] > 0 for a in expected), "the schedule should reach both arms"

    # lists: every list published, per arm, as the topic holds them (a user's events in one batch get one list)
    def lists_counted() -> bool:
        recs = [decode_recommendation(r.value) for r in read_all(bootstrap, f"{topic_prefix}recommendations")
                if r.value is not None]
        return all(worker.metric("streamrec_experiment_lists_total", variant=arm) == sum(r.variant == arm for r in recs)
                   for arm in expected)

    wait_for(lists_counted, 30, "every list counted under its arm", worker)
    # and each user's counts in their group of users, from which the report's intervals are worked out
    got_groups = {key: worker.metric("streamrec_experiment_groups_total", variant=key[0], group=key[1], field=key[2])
                  for key in groups}
    assert got_groups == groups
    # each user counted once, at their first list: the later lists of the schedule add none
    per_arm = {arm: sum(experiment.arm_of(u).name == arm for u in users) for arm in expected}
    assert {arm: worker.metric("streamrec_experiment_users_total", variant=arm) for arm in expected} == per_arm

    # streamrec report, reading the worker's /metrics, says the same
    out = subprocess.run([sys.executable, "-m", "stream.cli", "report", "--metrics",
                          f"http://127.0.0.1:{worker.metrics_port}", "--json-output"],
                         cwd=ROOT, env={**worker_env, "STREAMREC_VARIANTS": str(variants_file)},  # the arms' shares
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["control"] == "control"
    for arm, want in expected.items():
        got = summary["variants"][arm]
        assert got["denominator"] == {"kind": "impressions", "n": want["impressions"]}
        assert (got["clicked_lists"], got["clicks"], got["purchases"], got["revenue"]) == (
            want["clicked_lists"], want["clicks"], want["purchases"], want["revenue"])
        assert got["ctr"]["rate"] == want["clicked_lists"] / want["impressions"]
        assert got["conversion"]["rate"] == want["purchased_lists"] / want["impressions"]
    assert summary["variants"]["treatment"]["lift"]["ctr"] is not None
    assert summary["grouped"] and all(summary["variants"][arm]["ctr"]["design_effect"] >= 1 for arm in expected)
    assert summary["sample_ratio"]["users"] == per_arm  # checked against the file's shares: 14 and 10 is chance
    # the worker names the file it serves, which the report compares between workers and with its own
    assert worker.metric("streamrec_experiment_info", experiment="it-loop", digest=experiment.digest) == 1
    assert summary["warnings"] == []
    table = subprocess.run([sys.executable, "-m", "stream.cli", "report", "--metrics",
                            f"http://127.0.0.1:{worker.metrics_port}", "--chart", str(tmp_path / "report.png")],
                           cwd=ROOT, env=worker_env, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and "treatment" in table.stdout and "lift vs control" in table.stdout, table.stderr
    assert "count each user's lists together" in table.stdout
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert worker.stop() == 0, worker.log_tail()
