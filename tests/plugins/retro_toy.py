"""Test-only plugin: a tiny numeric pipeline that exercises the platform end to end.

source (recipe.n) -> scale (recipe.factor, sharded with parallel_map) -> total (recipe.offset)
Each stage may sleep (recipe.sleep) so tests can kill a run mid-stage.
"""

from __future__ import annotations

import time
from typing import Optional

from pydantic import Field

from retro.platform.registry import StrictModel, register
from retro.platform.stage import BaseRecipe, StageCall, StageContext, StageParams, stage
from retro.platform.store import open_memmap


def register_all() -> None:
    """Registration happens at import (decorators below)."""


@register("recipe", "toy")
class ToyRecipe(BaseRecipe):
    """Three chained numeric stages (tests only)."""

    class Config(StrictModel):
        n: int = Field(8, ge=1)
        """How many numbers the source writes."""
        factor: int = 2
        """Multiplier applied by the scale stage."""
        offset: int = 0
        """Added by the total stage only."""
        sleep: float = 0.0
        """Seconds each stage sleeps (to kill runs mid-stage in tests)."""
        fail: Optional[str] = None
        """Name of a stage that raises."""
        label: str = ""
        """Free text the source stage reads (tests keep secrets out of run files with it)."""
        miswire: Optional[str] = None
        """Tests of the wiring check: `misspelled-slot` or `missing-slot`."""

    def check(self, spec):
        from retro.platform.errors import SpecIssue

        if self.config.fail not in (None, "source", "scale", "total"):
            return [SpecIssue("recipe.fail", "not a toy stage", value=self.config.fail,
                              has_value=True, hint="source, scale or total")]
        return []

    def stages(self, spec):
        common = {"sleep": "recipe.sleep", "fail": "recipe.fail"}
        source = StageCall("source", "toy-source",
                           reads={"n": "recipe.n", "label": "recipe.label", **common})
        scale = StageCall("scale", "toy-scale", reads={"factor": "recipe.factor", **common},
                          inputs={"numbers": source})
        total = StageCall("total", "toy-total", reads={"offset": "recipe.offset", **common},
                          inputs={"numbers": scale})
        if self.config.miswire == "misspelled-slot":
            total.inputs = {"numbrs": scale}
        elif self.config.miswire == "missing-slot":
            total.inputs = {}
        return [source, scale, total]


class _Common(StageParams):
    sleep: float = 0.0
    """Seconds to sleep first."""
    fail: Optional[str] = None
    """The toy stage that raises."""


class SourceParams(_Common):
    n: int
    """How many numbers."""
    label: str = ""
    """Free text."""


class ScaleParams(_Common):
    factor: int
    """Multiplier."""


class TotalParams(_Common):
    offset: int
    """Added to the sum."""


def _maybe(ctx, name):
    if ctx.params.sleep:
        time.sleep(ctx.params.sleep)
    if ctx.params.fail == name:
        raise RuntimeError(f"toy stage {name} failed on purpose")


@stage("toy-source", version="1", params=SourceParams)
def toy_source(ctx: StageContext[SourceParams]):
    """The numbers 0..n-1."""
    _maybe(ctx, "source")
    arr = open_memmap(ctx.out_dir / "numbers.npy", "int64", (ctx.params.n,), mode="w+")
    arr[:] = range(ctx.params.n)
    arr.flush()
    return {"n": ctx.params.n}


def _scale_shard(args):
    values, factor = args
    return [v * factor for v in values]


@stage("toy-scale", version="1", params=ScaleParams, inputs={"numbers": "the numbers"})
def toy_scale(ctx: StageContext[ScaleParams]):
    """Each number times `factor`, in two parallel shards."""
    _maybe(ctx, "scale")
    import numpy as np

    numbers = open_memmap(ctx.inputs["numbers"].file("numbers.npy"))
    shards = [(numbers[i::2].tolist(), ctx.params.factor) for i in range(2)]
    parts = ctx.parallel_map(_scale_shard, shards)
    out = np.empty(len(numbers), dtype="int64")
    out[0::2], out[1::2] = parts[0], parts[1]
    np.save(ctx.out_dir / "numbers.npy", out)
    for step, v in enumerate(out[:3]):
        ctx.log_metrics(step=step, value=float(v))
    return {"n": len(out)}


@stage("toy-total", version="1", params=TotalParams, inputs={"numbers": "the numbers"},
       estimate=lambda p: {"offset": p.offset})
def toy_total(ctx: StageContext[TotalParams]):
    """Their sum plus `offset`."""
    _maybe(ctx, "total")
    numbers = open_memmap(ctx.inputs["numbers"].file("numbers.npy"))
    total = int(numbers.sum()) + ctx.params.offset
    (ctx.out_dir / "total.txt").write_text(str(total))
    return {"total": total}



# ---------------------------------------------------------------- a toy evaluation (reports)
# A non-RETRO recipe whose grading stage declares per-item results, so report tests can show
# that `retro report` finds comparisons from declarations alone (no stage-name conventions).
#
#   quiz ─► grade-strong        (learner skill = recipe.skill, with hints)
#        ├► grade-strong-nohint (the same learner, hints off: an ablation)
#        └► grade-plain         (a skill-0 learner, the reference arm)
# score_i = difficulty_i + skill + hint_bonus·hint + noise_i (noise seeded by arm and hint);
# nll_i = length_i · (3 − score_i / 4) gives a pooled exp-ratio metric like perplexity.

@register("recipe", "toy-quiz")
class ToyQuizRecipe(BaseRecipe):
    """A quiz graded for two learners and one ablation (tests only)."""

    class Config(StrictModel):
        n: int = Field(60, ge=2)
        """Questions in the quiz."""
        skill: int = 0
        """Skill of the strong learner (the plain one has 0)."""
        hint_bonus: float = 1.0
        """Score added to every question when hints are on."""
        noise: float = 0.3
        """Std of the per-question grading noise."""

    def stages(self, spec):
        grade = {"hint_bonus": "recipe.hint_bonus", "noise": "recipe.noise"}
        quiz = StageCall("quiz", "toy-quiz", reads={"n": "recipe.n"})
        strong = StageCall("learner-strong", "toy-learner", reads={"skill": "recipe.skill"},
                           consts={"arm": "strong", "baseline": False})
        plain = StageCall("learner-plain", "toy-learner",
                          consts={"skill": 0, "arm": "plain", "baseline": True})
        return [quiz, strong, plain, *(
            StageCall(name, "toy-grade", reads=grade, consts={"hint": hint},
                      inputs={"learner": learner, "quiz": quiz})
            for name, learner, hint in (("grade-strong", strong, True),
                                        ("grade-strong-nohint", strong, False),
                                        ("grade-plain", plain, True)))]


class QuizParams(StageParams):
    n: int


class LearnerParams(StageParams):
    skill: int
    arm: str
    baseline: bool


class GradeParams(StageParams):
    hint: bool
    hint_bonus: float
    noise: float


@stage("toy-quiz", version="1", params=QuizParams)
def toy_quiz(ctx):
    import json

    import numpy as np

    rng = np.random.default_rng(7)
    with open(ctx.out_dir / "quiz.jsonl", "w") as fh:
        for i in range(ctx.params.n):
            fh.write(json.dumps({"qid": f"q{i}", "difficulty": float(rng.normal(0, 2)),
                                 "length": 5 + i % 7}) + "\n")
    return {"n": ctx.params.n}


@stage("toy-learner", version="1", params=LearnerParams)
def toy_learner(ctx):
    (ctx.out_dir / "learner.json").write_text(ctx.params.model_dump_json())
    return {"skill": ctx.params.skill}


@stage("toy-grade", version="1", params=GradeParams,
       inputs={"learner": "the learner graded (toy-learner)", "quiz": "the questions (toy-quiz)"})
def toy_grade(ctx):
    import json
    import zlib

    import numpy as np

    from retro.platform.results import ItemSet, MetricDecl, Results, write_results

    learner = json.loads(ctx.inputs["learner"].file("learner.json").read_text())
    quiz = [json.loads(x) for x in
            ctx.inputs["quiz"].file("quiz.jsonl").read_text().splitlines()]
    p = ctx.params
    rng = np.random.default_rng(zlib.crc32(f"{learner['arm']}-{p.hint}".encode()))
    rows = []
    for q in quiz:
        score = q["difficulty"] + learner["skill"] + p.hint_bonus * p.hint \
            + float(rng.normal(0, p.noise))
        rows.append({"qid": q["qid"], "score": score, "length": q["length"],
                     "nll": q["length"] * (3 - score / 4)})
    with open(ctx.out_dir / "graded.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    write_results(ctx.out_dir, Results(
        family="toy-quiz", subject=["learner"], condition={} if p.hint else {"hint": False},
        reference=learner["baseline"],
        sets=[ItemSet(name="quiz", file="graded.jsonl", id="qid", unit="questions",
                      source=ctx.inputs["quiz"].key, metrics={
                          "score": MetricDecl(value="score", better="higher", headline=True),
                          "ppl": MetricDecl(aggregate="exp-ratio", num="nll", den="length",
                                            better="lower")})]))
    return {"mean_score": float(np.mean([r["score"] for r in rows]))}
