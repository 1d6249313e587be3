"""e2e.decode_steps: per-step decode times from SGLang's ``--decode-log-interval 1`` server logs."""

import pytest

from e2e.decode_steps import DecodeStep, by_bucket, decode_steps, fit, main, table


def decode(reqs, tokens, tput):
    return (f"[2026-12-02 07:07:26] Decode batch, #running-req: {reqs}, #token: {tokens}, token usage: 0.01, "
            f"cuda graph: True, gen throughput (token/s): {tput:.2f}, #queue-req: 0")


PREFILL = ("[2026-12-02 07:07:26] Prefill batch, #new-seq: 1, #new-token: 7, #cached-token: 0, token usage: 0.00, "
           "#running-req: 0, #queue-req: 0, #pending-token: 0, cuda graph: True, input throughput (token/s): 0.66")


def test_a_step_is_its_batch_over_the_throughput_and_steps_after_a_prefill_are_left_out():
    lines = [PREFILL, decode(1, 9, 0.09), decode(1, 10, 200.0), "unrelated line", decode(2, 30, 400.0), PREFILL,
             decode(3, 40, 300.0), decode(4, 50, 800.0)]
    steps = decode_steps(lines)
    assert steps == [DecodeStep(1, 10, 5.0), DecodeStep(2, 30, 5.0), DecodeStep(4, 50, 5.0)]


def test_buckets_group_batch_sizes_and_the_table_compares_two_backends():
    ours = [DecodeStep(r, 100 * r, 5.0 + 0.01 * r) for r in range(1, 17) for _ in range(6)]
    peer = [DecodeStep(r, 100 * r, 5.0) for r in range(1, 17) for _ in range(6)]
    assert sorted(by_bucket(ours, 8)) == [(1, 0), (9, 0)]
    assert all(len(g) == 48 for g in by_bucket(ours, 8).values())
    text = table({"ours": ours, "peer": peer}, 8)
    rows = [line for line in text.splitlines() if line.startswith("| 1-8") or line.startswith("| 9-16")]
    assert len(rows) == 2
    ratios = [float(r.rstrip(" |").rsplit("|", 1)[1]) for r in rows]
    assert 1.0 < ratios[0] < ratios[1]  # ours is slower, more so at larger batches
    assert "ours: 96 steps" in text


def test_a_log_without_per_step_lines_is_refused(tmp_path, monkeypatch, capsys):
    log = tmp_path / "ours" / "server.log"
    log.parent.mkdir()
    log.write_text(decode(4, 50, 800.0) + "\n")  # one line: no interval of its own
    monkeypatch.setattr("sys.argv", ["decode_steps", str(log)])
    with pytest.raises(SystemExit):
        main()
    assert "--decode-log-interval 1" in capsys.readouterr().err


def test_kv_buckets_compare_only_cells_both_backends_reached():
    ours = [DecodeStep(8, t, 5.5) for t in (1000, 1500, 5000) for _ in range(5)]
    peer = [DecodeStep(8, t, 5.0) for t in (1000, 1500, 9000) for _ in range(5)]
    assert sorted(by_bucket(ours, 8, 2000)) == [(1, 0), (1, 4000)]
    text = table({"ours": ours, "peer": peer}, 8, kv_width=2000)
    rows = [line for line in text.splitlines() if line.startswith("| 1-8")]
    assert rows == ["| 1-8 | 0-1999 | 10, 1250, 5.500 | 10, 1250, 5.000 | 1.100 |"]


def test_the_step_model_recovers_known_costs_despite_outliers():
    steps = [DecodeStep(r, t, 4.9 + 0.004 * r + 0.06 * t / 1000)
             for r in range(1, 41, 3) for t in range(500, 12000, 700)]
    steps += [DecodeStep(20, 5000, 30.0), DecodeStep(5, 900, 25.0)]  # steps that waited on something else
    model = fit(steps)
    assert model.steps == len(steps) - 2
    assert abs(model.base - 4.9) < 1e-6 and abs(model.per_request - 0.004) < 1e-6
    assert abs(model.per_1k_tokens - 0.06) < 1e-6
