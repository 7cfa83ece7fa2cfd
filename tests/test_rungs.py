"""Screening cheaply, then promoting: ``rungs`` train each configuration first on a shorter COMPLETE schedule and
part of the images; Optuna's successive-halving pruner promotes the best to the next rung, the last rung is the
study's own training."""

from __future__ import annotations

import re
from dataclasses import replace

import optuna
import pytest
from optuna.trial import TrialState

from hpsearch import objective, stopping
from hpsearch.spec import Rung, load_spec
from hpsearch.stopping import make_pruner, rung_step
from hpsearch.trials import is_enqueued
from tests.conftest import ONE_CONFIG_SPACE, TINY_SPACE, study_text

STORAGE = "sqlite:///hpsearch.db"
DATA = 'dataset = "synthetic:classes=3,size=12,train=400,test=32"'
RUNGS = 'rungs = [{ epochs = 1, train_fraction = 0.25 }, { epochs = 2, train_fraction = 0.5 }]'


def _study(write_study, extra: str, **kwargs):
    return write_study(text=study_text(dataset=DATA, extra=extra, **kwargs))


@pytest.mark.parametrize(("extra", "message"), [
    ('rungs = [{ epochs = 4 }]', "rungs[0].epochs = 4 must be an integer >= 1 and <= epochs (3)"),
    ('rungs = [{ epochs = 1, train_fraction = 0 }]', "rungs[0].train_fraction = 0 must be a number with 0 < "
                                                     "train_fraction <= 1"),
    ('rungs = [{ epochs = 1, images = 5 }]', "rungs[0].images = 5 is not a rung key; allowed: epochs, train_fraction"),
    ('rungs = [{ epochs = 2, train_fraction = 0.5 }, { epochs = 1, train_fraction = 0.5 }]',
     'rungs[0] = {"epochs": 2, "train_fraction": 0.5} must cost less (epochs x train_fraction = 1) than rungs[1] '
     "(0.5)"),
    ('rungs = [{ epochs = 3 }]', 'rungs[0] = {"epochs": 3} must cost less (epochs x train_fraction = 3) than the '
                                 "study's own 3 epochs on all its images (3)"),
    ('rungs = "fast"', 'rungs = "fast" must be an array of at most 8 tables such as '
                       '[{ epochs = 2, train_fraction = 0.1 }]'),
    (RUNGS + '\npruner = "median"', 'pruner = "median" with rungs must be "successive-halving" (it promotes the best '
                                    'of each rung to the next) or "none"'),
    (RUNGS + '\npruner = { type = "successive-halving", min_resource = 2 }',
     "pruner.min_resource = 2 is set by the rungs (each rung is one step); leave it out"),
    ('pruner = { type = "successive-halving", bootstrap_count = 2 }',
     'pruner.bootstrap_count = 2 needs an integer min_resource (Optuna counts the trials at a rung only once the '
     'rungs are sized; "auto" sizes them later)'),
    ('tta = "mirror"', 'tta = "mirror" is not known; allowed: none, flip, flip-translate'),
    ("final = { epochs = 0 }", "final.epochs = 0 must be an integer >= 1 and <= 10000"),
    ("final = { steps = 1 }", "final.steps = 1 is not a key of final; allowed: epochs, train_fraction"),
    ("final = { train_fraction = 2 }", "final.train_fraction = 2 must be a number with 0 < train_fraction <= 1"),
])
def test_bad_rungs_and_tta_are_one_line_errors(run_cli, write_study, extra, message) -> None:
    path = _study(write_study, extra, epochs=3)
    result = run_cli("run", str(path))
    assert result.code == 2
    assert result.err == f"error: {path}: {message}\n"


def test_rungs_default_to_successive_halving_on_rung_steps(write_study) -> None:
    spec = load_spec(_study(write_study, RUNGS, epochs=3))
    assert spec.rungs == (Rung(1, 0.25), Rung(2, 0.5))
    assert spec.pruner == {"type": "successive-halving"}
    assert [rung_step(spec, k) for k in range(2)] == [1, 3]  # reduction factor 3: SH's promotion steps
    pruner = make_pruner(spec)
    assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner)
    assert pruner._reduction_factor == 3  # the rungs' (Optuna's default, 4, would never judge rung 1 at step 3)
    assert spec.to_dict()["rungs"] == [{"epochs": 1, "train_fraction": 0.25}, {"epochs": 2, "train_fraction": 0.5}]
    assert "rungs" not in load_spec(_study(write_study, "")).to_dict()  # stored studies without rungs compare equal


@pytest.mark.parametrize(("bootstrap", "pruned"), [
    (0, [False, False, True, False, True]),  # Optuna's default: trial 1 is best of two, so it goes on for free
    (3, [False, True, True, False, True]),  # trials 1 and 2 wait for more than 3 at the rung: pruned
])
def test_bootstrap_count_makes_sampled_trials_wait_but_never_the_enqueued_row(write_study, bootstrap,
                                                                               pruned) -> None:
    """With ``bootstrap_count = 3`` a sampled trial reaching a rung with 3 or fewer there (itself included) is not
    promoted for want of anything to compare it with; the enqueued row, first at the rung, still is."""
    knobs = f', bootstrap_count = {bootstrap}' if bootstrap else ""
    spec = load_spec(_study(write_study, RUNGS + f'\npruner = {{ type = "successive-halving"{knobs} }}', epochs=3))
    study = optuna.create_study(direction="maximize", pruner=make_pruner(spec))
    study.enqueue_trial({"x": 0.0})
    decisions = []
    for value in [0.5, 0.9, 0.8, 0.95, 0.1]:
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        trial.report(value, rung_step(spec, 0))
        decisions.append(trial.should_prune())
    assert decisions == pruned


def test_a_run_says_which_trials_waited_and_trains_the_enqueued_row_to_the_end(run_cli, write_study) -> None:
    pruner = 'pruner = { type = "successive-halving", bootstrap_count = 3 }\nsampler = { type = "random" }'
    path = _study(write_study, RUNGS + "\n" + pruner, epochs=3, n_trials=4,
                  space=TINY_SPACE + "\n[[enqueue]]\nconv_layers = 1\n")
    result = run_cli("run", str(path))
    assert result.code == 0, result
    trials = optuna.load_study(study_name="tiny", storage=STORAGE).get_trials()
    assert trials[0].state == TrialState.COMPLETE  # the enqueued row, alone at both rungs, went on
    for t, there in ((trials[1], 2), (trials[2], 3)):  # the enqueued row and itself; then one more
        assert t.state == TrialState.PRUNED and set(t.intermediate_values) == {1}
        assert t.user_attrs["waited"] == (f"{there} trials had reached it, too few to compare with "
                                          "(bootstrap_count = 3)")
    assert "waited" not in trials[3].user_attrs  # 4 at rung 0: compared by its value
    assert "not promoted after rung 0: 2 trials had reached it, too few to compare with (bootstrap_count = 3)" \
        in result.out


def test_a_promotion_the_timeout_cannot_pay_for_is_refused_once_a_trial_is_complete(run_cli, write_study,
                                                                                     monkeypatch) -> None:
    real_fit = objective.fit

    def slow_fit(*args, **kwargs):  # as if every epoch had taken 1,000 s on the wall clock
        result = real_fit(*args, **kwargs)
        return replace(result, seconds_per_epoch=[1000.0] * len(result.seconds_per_epoch))

    monkeypatch.setattr(objective, "fit", slow_fit)
    path = _study(write_study, RUNGS + '\npruner = "none"\ntimeout = 600', epochs=3, n_trials=3)
    result = run_cli("run", str(path))
    assert result.code == 0, result
    trials = optuna.load_study(study_name="tiny", storage=STORAGE).get_trials()
    assert trials[0].state == TrialState.COMPLETE  # the first complete trial is never refused: the run returns it
    assert len(trials) == 3
    for t in trials[1:]:  # rung 0 trained 1 epoch on a quarter of the images: 4,000 s a full epoch, rung 1 needs 4,000
        assert t.state == TrialState.PRUNED and set(t.intermediate_values) == {1}
        assert t.user_attrs["cost_cap"] == "timeout"
        assert re.fullmatch(r"rung 1 would take about 4000 s, \d+ s of the run's timeout left",
                            t.user_attrs["over_cost"])
    assert "rung 1 would take about 4000 s" in result.out


def test_each_rung_is_a_complete_cheaper_training_and_only_promoted_trials_go_on(run_cli, write_study,
                                                                                monkeypatch) -> None:
    trained: list[tuple[int, int, int]] = []  # (trial, epochs of the schedule, training images)
    real_fit = objective.fit

    def recording_fit(built, data, config, **kwargs):
        result = real_fit(built, data, config, **kwargs)
        trained.append((-1, config.epochs, len(data.train)))
        return result

    monkeypatch.setattr(objective, "fit", recording_fit)
    pruner = 'pruner = { type = "successive-halving", dead_trial = false }'
    path = _study(write_study, RUNGS + f'\nsampler = {{ type = "random" }}\n{pruner}', epochs=3, n_trials=6)
    result = run_cli("run", str(path))
    assert result.code == 0, result
    study = optuna.load_study(study_name="tiny", storage=STORAGE)
    n_train = 400 - 40  # val_fraction 0.1
    assert {(e, n) for _, e, n in trained} <= {(1, round(n_train * 0.25)), (2, round(n_train * 0.5)), (3, n_train)}
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert complete and pruned  # successive halving stopped some after a rung
    for t in complete:
        assert set(t.intermediate_values) == {1, 3}  # both rungs reported at their steps, then the full training
        assert t.user_attrs["config"]["train"]["epochs"] == 3
    for t in pruned:
        assert set(t.intermediate_values) in ({1}, {1, 3})
    assert any(p.user_attrs.get("rung") == 0 for p in pruned)
    # every trial trained rung 0; fewer trained rung 1; fewer still the full schedule
    counts = [sum(e == epochs for _, e, _ in trained) for epochs in (1, 2, 3)]
    assert counts[0] == 6 and counts[0] >= counts[1] >= counts[2] == len(complete)
    assert "not promoted after rung" in result.out


def test_a_retry_resumes_in_the_rung_it_died_in(tmp_path, monkeypatch) -> None:
    """A trial killed in rung 1 resumes there from its checkpoint, not from rung 0 (whose value it inherited)."""
    import warnings

    import torch

    from hpsearch import artifacts
    from hpsearch.data import load
    from hpsearch.storage import MAX_RETRY, open_storage
    from hpsearch.study import open_study

    path = tmp_path / "study.toml"
    path.write_text(study_text(dataset=DATA, epochs=3, n_trials=1, space=ONE_CONFIG_SPACE,
                               extra=RUNGS + '\npruner = "none"'))
    spec = load_spec(path)
    cpu = torch.device("cpu")
    data = load(spec.dataset, data_dir=tmp_path, cache_dir=tmp_path, device=cpu, val_fraction=spec.val_fraction)
    study = open_study(spec, open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    store = artifacts.open_artifact_store(str(tmp_path / "artifacts"))
    run = objective.make_objective(spec, data, device=cpu, store=store)

    class Killed(Exception):
        pass

    real_fit = objective.fit
    stages: list[tuple[int, int | None]] = []

    def dying_fit(built, data_, config, *, resume=None, **kwargs):
        stages.append((config.epochs, None if resume is None else resume["epoch"]))
        if config.epochs == 2 and resume is None:  # rung 1: killed after its first epoch's checkpoint
            def on_epoch(epoch, result):
                if epoch == 1:
                    raise Killed
            kwargs["on_epoch"] = on_epoch
        return real_fit(built, data_, config, resume=resume, **kwargs)

    monkeypatch.setattr(objective, "fit", dying_fit)
    trial = study.ask()
    with pytest.raises(Killed):
        run(trial)
    study.tell(trial.number, state=TrialState.FAIL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY, inherit_intermediate_values=True)(
            study, study.trials[trial.number])
    retry = study.ask()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = run(retry)
    study.tell(retry.number, value)
    # first try: rung 0, then rung 1 killed after epoch 0's checkpoint; the retry: rung 1 from epoch 0, then full
    assert stages == [(1, None), (2, None), (2, 0), (3, None)]
    assert set(study.trials[retry.number].intermediate_values) == {1, 3}


def test_evaluate_trains_the_study_files_final_training_by_default(run_cli, write_study) -> None:
    """A study that searches on part of the images for few epochs says what its winner is trained with:
    ``final``, which ``hpsearch evaluate`` uses unless --epochs / --train-fraction say otherwise."""
    path = _study(write_study, "train_fraction = 0.5\nfinal = { epochs = 2, train_fraction = 1.0 }", epochs=1,
                  n_trials=1, space=ONE_CONFIG_SPACE)
    assert run_cli("run", str(path)).code == 0
    assert run_cli("evaluate", "tiny", "--seeds", "1").code == 0
    record = optuna.load_study(study_name="tiny", storage=STORAGE).user_attrs["evaluate:0"]
    assert (record["epochs"], record["schedule_epochs"], record["train_fraction"]) == (2, 2, 1.0)
    assert run_cli("evaluate", "tiny", "--seeds", "1", "--epochs", "1", "--train-fraction", "0.5").code == 0
    record = optuna.load_study(study_name="tiny", storage=STORAGE).user_attrs["evaluate:0"]
    assert (record["epochs"], record["train_fraction"]) == (1, 0.5)


def _rung0(study: optuna.Study, value: float, *, pruner) -> tuple[int, bool]:
    """A sampled trial reporting ``value`` at rung 0 (step 1); told PRUNED when successive halving stops it."""
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    trial.report(value, 1)
    stopped = trial.should_prune()
    study.tell(trial, state=TrialState.PRUNED if stopped else TrialState.COMPLETE, values=None if stopped else value)
    return trial.number, stopped


def test_a_trial_that_joins_its_rungs_top_third_later_is_promoted_late_and_counted_once(write_study) -> None:
    """Asynchronous successive halving: Optuna judges a trial once, when it reaches a rung; a trial pruned then
    that is in the rung's top 1/3 once more trials are there goes on (enqueued again, from the next rung, carrying
    its rung values). Its copy of those values does not count twice when later trials are judged."""
    spec = load_spec(_study(write_study, RUNGS + '\npruner = "successive-halving"', epochs=3))
    pruner = make_pruner(spec)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    outcomes = [_rung0(study, v, pruner=pruner) for v in (0.5, 0.4, 0.45, 0.48, 0.3)]
    assert [stopped for _, stopped in outcomes] == [False, True, True, True, True]  # top 1 of up to 5
    assert pruner.promote_late(study) == []  # 0.48 is second of five: not in the top 1
    assert _rung0(study, 0.2, pruner=pruner) == (5, True)
    assert pruner.promote_late(study) == [3]  # six at the rung: the top 2 are 0.5 and trial 3's 0.48
    assert pruner.promote_late(study) == []  # once
    late = study.ask()  # the enqueued late promotion
    assert late.number == 6 and late.user_attrs["late_promotion"] == {
        "trial": 3, "rung": 0, "enqueued": False, "values": {"0": 0.48}, "seconds_per_epoch": None}
    stopping.inherit_rungs(late, late.user_attrs["late_promotion"], [1, 3])
    late.suggest_float("x", 0, 1)
    late.report(0.7, 3)
    assert not late.should_prune()  # judged at rung 1 (against nothing there yet), not again at rung 0
    study.tell(late, 0.75)
    assert study.trials[6].intermediate_values == {1: 0.48, 3: 0.7}
    assert [_rung0(study, v, pruner=pruner)[1] for v in (0.1, 0.15)] == [True, True]
    # Nine configurations at rung 0, so the top 3 go on: 0.5, 0.48 and now 0.46. Were trial 6's copy of 0.48 counted,
    # there would be ten values and the top 3 would be 0.5, 0.48, 0.48.
    assert _rung0(study, 0.46, pruner=pruner) == (9, False)


def _scripted_run(run_cli, write_study, monkeypatch, n_trials: int):
    """A run whose stage values are scripted by trial seed (= the trial number at seed 0): trial 3 is stopped at
    rung 0 and promoted late once trial 5 is there. The result, the trials and (seed, epochs) of every stage."""
    real_fit = objective.fit
    values = {1: {0: 0.5, 1: 0.4, 2: 0.45, 3: 0.48, 4: 0.3, 5: 0.2, 8: 0.1}, 2: {0: 0.55, 3: 0.7},
              3: {0: 0.6, 3: 0.75}}
    trained = []

    def scripted_fit(built, data, train, **kwargs):
        trained.append((kwargs["seed"], train.epochs))
        result = real_fit(built, data, train, **kwargs)
        value = values[train.epochs][kwargs["seed"]]
        return replace(result, best_val_accuracy=value, final_accuracy=value)

    monkeypatch.setattr(objective, "fit", scripted_fit)
    path = _study(write_study, RUNGS + '\npruner = "successive-halving"\nsampler = { type = "random" }', epochs=3,
                  n_trials=n_trials, space=TINY_SPACE + "\n[[enqueue]]\nconv_layers = 1\n")
    result = run_cli("run", str(path))
    assert result.code == 0, result
    return result, optuna.load_study(study_name="tiny", storage=STORAGE).get_trials(), trained


def test_a_late_promotion_in_a_run_trains_from_the_next_rung_with_its_trials_initial_weights(
        run_cli, write_study, monkeypatch) -> None:
    result, trials, trained = _scripted_run(run_cli, write_study, monkeypatch, n_trials=7)
    assert [t.state for t in trials] == [TrialState.COMPLETE] + [TrialState.PRUNED] * 5 + [TrialState.COMPLETE]
    late = trials[6]
    assert late.params == trials[3].params and late.user_attrs["late_promotion"]["trial"] == 3
    assert late.intermediate_values == {1: 0.48, 3: 0.7} and late.value == 0.75
    # Trial 3 trained rung 0; the late promotion rung 1 and the study's own training from trial 3's initial weights.
    assert [t for t in trained if t[0] == 3] == [(3, 1), (3, 2), (3, 3)]
    assert not is_enqueued(late)  # a sampled configuration, for the comparisons with the enqueued rows
    assert "trial    6 COMPLETE 0.7500 (trial 3 promoted late from rung 0)" in result.out


def test_of_two_copies_of_a_late_promotion_one_trains(write_study) -> None:
    """Two workers finishing at the same moment can both queue the same late promotion: the later copy is refused
    while the earlier is queued, running or finished; a failed copy (its retry is a copy) and refused ones do not
    count, so the retry trains."""
    late = {"trial": 3, "rung": 0, "enqueued": False, "values": {"0": 0.48}, "seconds_per_epoch": None}
    study = optuna.create_study(direction="maximize")
    for rung in (0, 0, 0, 1):
        study.enqueue_trial({"x": 0.5}, user_attrs={"late_promotion": {**late, "rung": rung}})
    first, second, retry, next_rung = (study.ask() for _ in range(4))
    stopping.refuse_duplicate_late(first, late)
    with pytest.raises(optuna.TrialPruned):
        stopping.refuse_duplicate_late(second, late)
    assert second.user_attrs["rejected"] == ("a second copy of trial 0, the late promotion of trial 3 from rung 0 "
                                             "(two workers queued it at once)")
    study.tell(second, state=TrialState.PRUNED)
    study.tell(first, state=TrialState.FAIL)  # its worker died: the retry is the third copy
    stopping.refuse_duplicate_late(retry, late)
    stopping.refuse_duplicate_late(next_rung, next_rung.user_attrs["late_promotion"])  # another rung: not a copy


def test_a_late_promotion_queued_twice_in_a_run_trains_once(run_cli, write_study, monkeypatch) -> None:
    real = stopping.SuccessiveHalving.promote_late

    def with_a_second_worker(self, study):  # which finished a trial at the same moment and queued the same
        promoted = real(self, study)
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        for t in waiting[len(waiting) - len(promoted):]:
            study.enqueue_trial(t.system_attrs["fixed_params"], user_attrs=t.user_attrs)
        return promoted

    monkeypatch.setattr(stopping.SuccessiveHalving, "promote_late", with_a_second_worker)
    result, trials, trained = _scripted_run(run_cli, write_study, monkeypatch, n_trials=8)
    assert [t.state for t in trials] == ([TrialState.COMPLETE] + [TrialState.PRUNED] * 5
                                         + [TrialState.COMPLETE] + [TrialState.PRUNED] * 2)
    copy = trials[7]
    assert copy.user_attrs["late_promotion"] == trials[6].user_attrs["late_promotion"]
    assert copy.user_attrs["rejected"].startswith("a second copy of trial 6, the late promotion of trial 3")
    assert copy.params == {}  # refused before its parameters were stored: not an observation for the sampler
    assert [t for t in trained if t[0] in (3, 7)] == [(3, 1), (3, 2), (3, 3)]  # the configuration trained once
    assert "trial    7 PRUNED   a second copy of trial 6" in result.out
    shown = run_cli("show", "tiny")
    flat = re.sub(r"[│\s]+", " ", shown.out)  # the summary table may wrap a long cell
    assert "rejected 1 of the pruned (1 a late promotion queued twice; not counted)" in flat
