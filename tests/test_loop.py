"""The sampling loop's pieces, each alone (no models): the window schedule per call, the
two executions (one process; ranks that split the windows and gather), the mode's
decisions per step, the step-down's regrouping, and the one vocabulary of stage names.
The whole loop against the original is tests/test_pipeline.py; every plan the same
function, tests/test_savings.py; ranks against one process, tests/test_distributed.py."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from magicanimate_rt import stage_names
from magicanimate_rt.engines.specs import SPEC_BUILDERS, STAGE_NAMES
from magicanimate_rt.runtime import compiled, planner, timing
from magicanimate_rt.runtime.backends.torch_backend import COMPILED_CALLS
from magicanimate_rt.runtime.modes import PRESETS, SamplingMode, StepPolicy
from magicanimate_rt.runtime.planner import LoopPlan, RequestPlan, next_rung
from magicanimate_rt.runtime.sampling import DenoiseLoop, OneProcess, SplitOverRanks, WindowSchedule, call_windows
from magicanimate_rt.runtime.stages import Capabilities
from magicanimate_rt.runtime.timing import StageTimer
from magicanimate_rt.runtime.windows import context_windows

PACKAGE = Path(__file__).resolve().parents[1] / "magicanimate_rt"


# --------------------------------------------------------------------------- the schedule
def test_calls_group_consecutive_windows_of_this_process():
    # 40 frames: windows start at 0, 12, 24, 36 (four windows)
    assert len(context_windows(40)) == 4
    assert call_windows(4, 1) == [[0], [1], [2], [3]]
    assert call_windows(4, 3) == [[0, 1, 2], [3]]
    assert call_windows(4, 8) == [[0, 1, 2, 3]]
    assert call_windows(4, 2, share=range(1, 4)) == [[1, 2], [3]]  # a rank's share
    assert call_windows(1, 4) == [[0]] and call_windows(3, 2, share=range(3, 3)) == []


@pytest.mark.parametrize("num_frames", [16, 32, 48])
def test_schedule_counts_and_calls(num_frames):
    win = context_windows(num_frames)
    s = WindowSchedule(num_frames, 16, 4, torch.device("cpu"), torch.float64)
    # visit counts: an independent count over the window lists
    want = [sum(f in w for w in win) for f in range(num_frames)]
    assert s.counts.flatten().tolist() == want and s.frames == 16
    for plan in (LoopPlan(windows_per_call=2), LoopPlan(windows_per_call=2, controlnet_residuals="per_window")):
        calls = s.calls(plan)
        assert [list(c.windows) for c in calls] == call_windows(len(win), 2)
        for c in calls:
            assert c.rows.tolist() == [f for k in c.windows for f in win[k]]
            if plan.controlnet_residuals == "per_window":  # each row finds its frame among the distinct ones
                assert c.distinct.tolist() == sorted(set(c.rows.tolist()))
                assert c.distinct[c.where].tolist() == c.rows.tolist()
            else:
                assert c.distinct is None and c.where is None


def test_a_share_needs_only_its_windows_frames():
    s = WindowSchedule(40, 16, 4, torch.device("cpu"), torch.float32)
    win = context_windows(40)
    for share in (range(0, 2), range(2, 4), range(3, 4)):
        assert s.needed(share).nonzero().flatten().tolist() == sorted({f for k in share for f in win[k]})


# --------------------------------------------------------------------------- the executions
class FakeRanks:
    """Two ranks in one process: rank ``rank``'s share of the windows; the gather returns
    the predictions every rank kept, as the all-gather does."""

    def __init__(self, rank: int, size: int, gathered=None):
        self.rank, self.size, self.gathered = rank, size, gathered

    def share(self, n: int) -> range:
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))

    def gather_windows(self, local, n):
        return torch.cat(self.gathered(), dim=0)

    def broadcast(self, t):
        return t


@pytest.mark.parametrize("guided", [True, False])
def test_ranks_that_split_and_gather_add_what_one_process_adds(guided):
    # float64 sums of the same predictions in the same window order: bitwise the same
    n, f = 40, 16
    s = WindowSchedule(n, f, 4, torch.device("cpu"), torch.float64)
    g = torch.Generator().manual_seed(0)
    preds = [(torch.randn((1, 4, f, 2, 3), generator=g, dtype=torch.float64),
              torch.randn((1, 4, f, 2, 3), generator=g, dtype=torch.float64)) for _ in s.windows]

    def run(execution, plan):
        sum_c = torch.zeros((1, 4, n, 2, 3), dtype=torch.float64)
        sum_u = torch.zeros_like(sum_c) if guided else None
        for call in s.calls(plan, execution.share):
            eps_u = torch.cat([preds[k][0] for k in call.windows]) if guided else None
            execution.add(call, eps_u, torch.cat([preds[k][1] for k in call.windows]), sum_u, sum_c)
        return sum_u, sum_c, execution

    one = run(OneProcess(), LoopPlan(windows_per_call=3))
    ranks = [SplitOverRanks(FakeRanks(r, 2), s) for r in range(2)]
    parts = [run(e, LoopPlan(windows_per_call=1))[2].local for e in ranks]
    assert [len(p) for p in parts] == [2, 2]
    for e in ranks:  # every rank ends with the same sums as one process
        e.ranks.gathered = lambda: [torch.stack(p) for p in parts]
        sum_c = torch.zeros((1, 4, n, 2, 3), dtype=torch.float64)
        sum_u = torch.zeros_like(sum_c) if guided else None
        e.gather(sum_u, sum_c, sum_c, StageTimer(torch.device("cpu")))
        assert torch.equal(sum_c, one[1]) and e.local == []
        assert (sum_u is None and one[0] is None) or torch.equal(sum_u, one[0])
    # and the sums are the per-frame totals (an independent computation)
    want = torch.zeros(n, dtype=torch.float64)
    for k, w in enumerate(context_windows(n)):
        want[w] += preds[k][1][0, 0, :, 0, 0]
    assert torch.allclose(one[1][0, 0, :, 0, 0], want, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- the mode's decisions
def test_the_mode_decides_guidance_and_reuse_per_step():
    exact = PRESETS["exact"].policy(25)
    assert exact == StepPolicy() and not exact.reuses_deep_features
    assert all(exact.guided(i) and exact.whole(i) for i in range(25))
    fast = PRESETS["fast"].policy(15)  # guidance for the first half, every 3rd step whole
    assert [i for i in range(15) if fast.guided(i)] == list(range(8))
    assert [i for i in range(15) if fast.whole(i)] == [0, 3, 6, 9, 12]
    assert fast.reuses_deep_features and fast.cache_depth == 1
    assert [i for i in range(4) if SamplingMode(guidance_until=0.0).policy(4).guided(i)] == []


# --------------------------------------------------------------------------- stepping down
def fake_loop(policy=StepPolicy(), execution=None, lean=True):
    memory = []
    stages = SimpleNamespace(capabilities=Capabilities(lean_unet=lean, max_windows_per_call=None, deep_cache=True),
                             follow_plan=lambda p: memory.append((p.loop.cfg_sequential, p.loop.ff_chunk)),
                             shallow_skips=lambda depth: 3)
    s = WindowSchedule(40, 16, 4, torch.device("cpu"), torch.float32)
    plan = RequestPlan(LoopPlan(windows_per_call=4))
    loop = DenoiseLoop(stages, torch.zeros(40, 3, 8, 8), torch.float32, s, None, 7.5, plan, None, policy,
                       execution or OneProcess(), StageTimer(torch.device("cpu")))
    return loop, memory


def test_step_down_regroups_the_calls_once():
    loop, memory = fake_loop()
    assert [c.windows for c in loop.calls] == [(0, 1, 2, 3)]
    changes = []
    assert loop.step_down(lambda old, new: changes.append((old, new)))
    assert [c.windows for c in loop.calls] == [(0,), (1,), (2,), (3,)]
    assert all(c.distinct is not None for c in loop.calls)  # residuals per window now
    assert changes == [(RequestPlan(LoopPlan(windows_per_call=4)), loop.plan)] and loop.plan.steps_down == 1
    assert memory == [(True, loop.plan.loop.ff_chunk)]
    assert not loop.step_down()  # once


def test_no_step_down_over_ranks_or_with_kept_features():
    s = WindowSchedule(40, 16, 4, torch.device("cpu"), torch.float32)
    assert not fake_loop(execution=SplitOverRanks(FakeRanks(0, 2), s))[0].step_down()
    assert not fake_loop(policy=StepPolicy(cache_interval=3))[0].step_down()
    assert fake_loop(policy=StepPolicy(guided_steps=3))[0].step_down()  # partial guidance keeps no state


# --------------------------------------------------------------------------- stage names
def test_one_vocabulary_of_stage_names():
    assert STAGE_NAMES == stage_names.ENGINES == tuple(SPEC_BUILDERS)
    assert compiled.STAGES == stage_names.CALLS == tuple(COMPILED_CALLS)
    assert planner.ALL_STAGES == stage_names.WEIGHTS
    assert planner.PHASE_STAGES == stage_names.PHASE_WEIGHTS
    assert set().union(*planner.PHASE_STAGES.values()) == set(planner.ALL_STAGES)
    assert timing.LABELS == stage_names.TIMER_LABELS


def literal_calls(method: str) -> list[tuple[str, str]]:
    """(file, first argument) of every ``x.method("literal", ...)`` call in the package."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == method
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                found.append((path.name, node.args[0].value))
    return found


def test_timings_and_compiled_calls_use_the_vocabulary():
    labels = literal_calls("stage")
    assert {"sampling.py", "pipeline.py"} <= {f for f, _ in labels} and len(labels) >= 10
    assert [x for x in labels if x[1] not in stage_names.TIMER_LABELS] == []
    calls = literal_calls("_call")
    assert len(calls) >= 6 and [x for x in calls if x[1] not in stage_names.CALLS] == []


# --------------------------------------------------------------------------- one ladder
def test_the_out_of_memory_step_downs_are_the_ladders_rungs():
    from magicanimate_rt.runtime import pipeline
    from magicanimate_rt.runtime.stages import FF_CHUNK_TOKENS

    # the ladder ends with the UNet's lean rungs; the out-of-memory step-down takes the last
    assert planner.lean_unet_rungs(False) == [(False, None)]
    assert planner.lean_unet_rungs(True) == [(False, None), (True, None), (True, FF_CHUNK_TOKENS)]
    plan = RequestPlan(LoopPlan(windows_per_call=3, decode_chunk=8), rung=2)
    down = next_rung(plan, Capabilities(lean_unet=True))
    assert (down.loop.cfg_sequential, down.loop.ff_chunk, down.rung, down.steps_down) == (True, FF_CHUNK_TOKENS, 2, 1)
    plain = next_rung(plan, Capabilities()).loop
    assert (plain.cfg_sequential, plain.ff_chunk, plain.windows_per_call) == (False, None, 1)
    # the decode's step-down (pipeline._decode) is the same function: a quarter of the
    # chunk, and at the leanest nothing left to step down to
    assert down.loop.decode_chunk == 2 and next_rung(next_rung(down, Capabilities(lean_unet=True)),
                                                     Capabilities(lean_unet=True)) is None
    # "auto"'s limits: one table, plan_loop's defaults are its CUDA row
    assert pipeline.AUTO_LIMITS is planner.AUTO_LIMITS
    assert planner.plan_loop(64, 6, None, None) == LoopPlan(windows_per_call=planner.AUTO_LIMITS["cuda"][0],
                                                           decode_chunk=planner.AUTO_LIMITS["cuda"][1])
