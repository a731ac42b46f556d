"""The command line, `python -m cprop`: demo, info, bench, train and predict, and how it fails.

A few commands run in a real subprocess (exit codes, stdout/stderr, no traceback); the rest
call cprop.__main__.main in-process, which is the same code without an interpreter start.
"""
import re
import subprocess
import sys

import numpy as np
import pytest

import cprop
from cprop.__main__ import main

SUBCOMMANDS = ["demo", "train", "predict", "info", "bench"]


def run(*args, cwd, timeout=120):
    """`python -m cprop ARGS` in `cwd`: the CompletedProcess, text output."""
    return subprocess.run([sys.executable, "-m", "cprop", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def assert_clean_error(code, err, command, *words):
    """Exit code 2 and exactly one line on stderr, `cprop COMMAND: error: ...`, naming `words`."""
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"cprop {command}: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], err


# -- data files ----------------------------------------------------------------------------------

N_DIGITS = 400


def label_of(digit):
    # labels that are not 0..n-1, so predict must map the network's classes back to them
    return 100 + 7 * digit


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A digits CSV (target column 'digit' first, integer pixel counts), a regression CSV,
    the same regression problem as NPZ, and the true targets."""
    root = tmp_path_factory.mktemp("cli")
    X, digit = cprop.datasets.load_digits(scale=False)
    X, digit = X[:N_DIGITS].astype(np.int64), digit[:N_DIGITS]
    header = ",".join(["digit"] + [f"px{i}" for i in range(64)])
    np.savetxt(root / "digits.csv", np.column_stack([label_of(digit), X]), delimiter=",", header=header,
               comments="", fmt="%d")
    np.savetxt(root / "digits_features.csv", X, delimiter=",", header=header.split(",", 1)[1], comments="",
               fmt="%d")
    np.savetxt(root / "digits_narrow.csv", X[:, :10], delimiter=",",
               header=",".join(f"px{i}" for i in range(10)), comments="", fmt="%d")

    rng = np.random.default_rng(0)
    Xr = rng.uniform(-1, 1, size=(200, 3))
    yr = 2.0 * Xr[:, 0] - Xr[:, 1] + 0.5 * Xr[:, 2] + 0.3
    np.savetxt(root / "regression.csv", np.column_stack([Xr, yr]), delimiter=",", header="a,b,c,target",
               comments="")
    np.savez(root / "regression.npz", X=Xr, y=yr)
    np.savez(root / "digits.npz", X=X.astype(np.float64), y=digit)
    return {"root": root, "digit": digit, "yr": yr}


@pytest.fixture(scope="module")
def digits_model(files):
    """`cprop train` on the digits CSV in a real subprocess: (process, model path)."""
    root = files["root"]
    proc = run("train", "digits.csv", "--target", "digit", "--hidden", "32", "--epochs", "15",
               "--validation-split", "0.1", "--out", "digits_model.npz", "--quiet", cwd=root)
    return proc, root / "digits_model.npz"


# -- demo, info, help, bench ---------------------------------------------------------------------

def test_demo_prints_held_out_accuracy(tmp_path):
    proc = run("demo", "--epochs", "5", "--quiet", cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    match = re.search(r"held-out accuracy (\d+\.\d+)%", proc.stdout)
    assert match, proc.stdout
    assert float(match.group(1)) > 80          # 5 epochs of SGD on the digits: ~95%
    assert "epoch " not in proc.stdout         # --quiet: no per-epoch lines


def test_info_mentions_openmp_and_threads(tmp_path):
    proc = run("info", cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert re.search(r"openmp: (True|False)", proc.stdout), proc.stdout
    assert re.search(r"threads: [1-9]\d*\b", proc.stdout), proc.stdout
    assert cprop.__version__ in proc.stdout


def test_info_in_process(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "openmp" in out and "blas" in out and cprop.__version__ in out


def test_top_level_help_lists_every_subcommand(tmp_path):
    proc = run("--help", cwd=tmp_path)

    assert proc.returncode == 0 and proc.stderr == ""
    for command in SUBCOMMANDS:
        assert command in proc.stdout


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])

    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cprop {command}")


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: cprop" in capsys.readouterr().out


def test_bench_quick_prints_a_table(tmp_path):
    proc = run("bench", "--quick", "--workload", "tiny", "--peers", "numpy", "--threads", "1", cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert any(row[:2] == ["workload", "layers"] for row in rows)
    training = [row for row in rows if row[:1] == ["tiny"] and "cprop" in row]
    assert training and "2-32-32-1" in training[0]
    assert any(row and row[0] == "numpy" for row in rows)          # the peer's row


def test_bench_estimators_compares_the_drop_in_with_sklearn(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("threadpoolctl")
    from cprop.bench import estimators

    out = tmp_path / "est.json"
    cprop.set_num_threads(2)
    try:
        assert main(["bench", "--estimators", "--quick", "--threads", "1", "--json", str(out)]) == 0
        assert cprop.get_num_threads() == 2            # the bench's --threads did not stick
    finally:
        cprop.set_num_threads(None)
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    import json
    report = json.loads(out.read_text())
    assert [e["case"] for e in report["estimators"]] == list(estimators.ESTIMATOR_CASES)
    for entry in report["estimators"]:
        # same parameters, the same number of epochs done by both, a positive ratio
        assert {len(res["seconds"]) for res in entry["estimators"].values()} == {1}
        n_iter = {res["n_iter"][0] for res in entry["estimators"].values()}
        assert n_iter == {entry["params"]["max_iter"]}
        assert entry["sklearn_over_cprop"] > 0
        assert all(0 <= res["accuracy"][0] <= 1 for res in entry["estimators"].values())
        printed = [row for row in rows if row[:1] == [entry["case"]]]
        assert printed and printed[0][3] == "cprop" and printed[0][6].endswith("x")


@pytest.mark.parametrize("option", [["--plot", "x.png"], ["--peers", "torch"], ["--workload", "tiny"],
                                    ["--dtype", "float64"]], ids=lambda o: o[0])
def test_bench_estimators_refuses_the_workloads_options(option, capsys):
    code = main(["bench", "--estimators", "--quick", *option])
    assert_clean_error(code, capsys.readouterr().err, "bench", option[0], "--estimators")


def test_bench_refuses_an_unknown_workload(capsys):
    code = main(["bench", "--quick", "--workload", "huge", "--peers", "none"])
    assert_clean_error(code, capsys.readouterr().err, "bench", "huge", "tiny")


# -- train and predict ---------------------------------------------------------------------------

def test_train_on_csv_then_predict_gives_labels_from_the_original_set(files, digits_model):
    proc, model = digits_model
    assert proc.returncode == 0, proc.stderr
    assert "cross_entropy" in proc.stdout and model.exists()

    predicted = run("predict", model, "digits.csv", "--target", "digit", cwd=files["root"])

    assert predicted.returncode == 0, predicted.stderr
    lines = predicted.stdout.splitlines()
    assert len(lines) == N_DIGITS
    labels = np.array([int(line) for line in lines])
    assert set(labels) <= {label_of(d) for d in range(10)}
    assert np.mean(labels == label_of(files["digit"])) > 0.9


def test_saved_model_keeps_classes_and_scaling(digits_model):
    _, model = digits_model
    trainer = cprop.Trainer.load(model)

    assert trainer.extra["classes"] == [label_of(d) for d in range(10)]
    assert trainer.extra["features"] == [f"px{i}" for i in range(64)]
    assert len(trainer.extra["mean"]) == len(trainer.extra["std"]) == 64
    assert trainer.epochs_done == 15 and len(trainer.history.val_loss) == 15
    assert trainer.net.architecture()["sizes"] == [64, 32, 10]


def test_predict_without_the_target_column_and_to_a_file(files, digits_model, capsys):
    _, model = digits_model
    out = files["root"] / "predictions.txt"

    assert main(["predict", str(model), str(files["root"] / "digits_features.csv"), "--out", str(out)]) == 0

    assert f"wrote {N_DIGITS} predictions" in capsys.readouterr().out
    lines = out.read_text().splitlines()
    assert len(lines) == N_DIGITS
    assert np.mean(np.array(lines, dtype=int) == label_of(files["digit"])) > 0.9


@pytest.mark.parametrize("data, target", [("regression.csv", "target"), ("regression.npz", None)])
def test_regression_train_and_predict(data, target, files, tmp_path, capsys):
    model = tmp_path / "reg.npz"
    data = str(files["root"] / data)
    target_args = ["--target", target] if target else []

    assert main(["train", data, *target_args, "--hidden", "16", "--epochs", "40", "--quiet",
                 "--out", str(model)]) == 0
    assert "loss mse" in capsys.readouterr().out
    assert main(["predict", str(model), data, *target_args]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 200
    predicted = np.array(lines, dtype=float)
    yr = files["yr"]
    r2 = 1 - np.sum((predicted - yr) ** 2) / np.sum((yr - yr.mean()) ** 2)
    assert r2 > 0.9


def test_train_on_npz_classification(files, tmp_path, capsys):
    model = tmp_path / "npz_model.npz"
    data = str(files["root"] / "digits.npz")

    assert main(["train", data, "--hidden", "32", "--epochs", "10", "--optimizer", "adam", "--lr", "0.01",
                 "--dtype", "float64", "--quiet", "--out", str(model)]) == 0
    assert main(["predict", str(model), data]) == 0

    out = capsys.readouterr().out
    labels = np.array(out.splitlines()[-N_DIGITS:], dtype=int)
    assert np.mean(labels == files["digit"]) > 0.9
    assert cprop.Trainer.load(model).net.dtype == np.float64


# -- errors: one line on stderr, exit code 2 -----------------------------------------------------

def test_missing_file_is_a_clean_error(tmp_path):
    proc = run("train", "no_such.csv", "--target", "y", cwd=tmp_path)
    assert_clean_error(proc.returncode, proc.stderr, "train", "no_such.csv")


def test_non_model_file_is_a_clean_error(files):
    proc = run("predict", "digits.csv", "digits_features.csv", cwd=files["root"])
    assert_clean_error(proc.returncode, proc.stderr, "predict", "digits.csv")


@pytest.mark.parametrize("case", ["unknown target", "bad hidden", "negative hidden", "missing model",
                                  "foreign npz", "npz without y", "one class"])
def test_train_and_predict_errors_in_process(case, files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                # where train would write its default model.npz
    root = files["root"]
    np.savez(tmp_path / "foreign.npz", a=np.zeros(3))
    np.savez(tmp_path / "no_y.npz", X=np.zeros((4, 2)))
    (tmp_path / "one_class.csv").write_text("a,b\n1,0\n2,0\n3,0\n")
    command, argv, words = {
        "unknown target": ("train", ["train", root / "digits.csv", "--target", "label"], ["'label'", "digit"]),
        "bad hidden": ("train", ["train", root / "digits.csv", "--target", "digit", "--hidden", "32,x"],
                       ["--hidden", "32,x"]),
        "negative hidden": ("train", ["train", root / "digits.csv", "--target", "digit", "--hidden", "-4"],
                            ["--hidden", "-4"]),
        "missing model": ("predict", ["predict", tmp_path / "none.npz", root / "digits.csv"], ["none.npz"]),
        "foreign npz": ("predict", ["predict", tmp_path / "foreign.npz", root / "digits.csv"], ["foreign.npz"]),
        "npz without y": ("train", ["train", tmp_path / "no_y.npz"], ["target"]),
        "one class": ("train", ["train", tmp_path / "one_class.csv", "--target", "b"], ["single class"]),
    }[case]

    code = main([str(a) for a in argv])

    assert_clean_error(code, capsys.readouterr().err, command, *words)
    assert not (tmp_path / "model.npz").exists()


def test_predict_with_the_wrong_number_of_columns(files, digits_model, capsys):
    _, model = digits_model
    root = files["root"]

    code = main(["predict", str(model), str(root / "digits_narrow.csv")])
    assert_clean_error(code, capsys.readouterr().err, "predict", "64", "10")

    # the target column left in without --target: one column too many, and the message says so
    code = main(["predict", str(model), str(root / "digits.csv")])
    assert_clean_error(code, capsys.readouterr().err, "predict", "--target")
