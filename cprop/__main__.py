"""The ``cprop`` command line: demo, info, bench, train, predict."""
import argparse
import sys
import time


class UsageError(Exception):
    """A user mistake: printed as one line, exit code 2."""


def _demo(args):
    import numpy as np
    import cprop

    X, y = cprop.datasets.load_digits()
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(X))
    n_test = len(X) // 5
    test, train = order[:n_test], order[n_test:]
    net = cprop.Sequential([cprop.Dense(64, args.hidden, "relu"), cprop.Dense(args.hidden, 10)],
                           seed=args.seed)
    trainer = cprop.Trainer(net, loss="cross_entropy",
                            optimizer=cprop.SGD(lr=0.05, momentum=0.9),
                            batch_size=32, seed=args.seed, n_threads=args.threads)
    print(f"cprop {cprop.__version__}: training a 64-{args.hidden}-10 relu network on the bundled "
          f"UCI digits ({len(train)} train / {len(test)} held-out samples)")
    start = time.perf_counter()
    history = trainer.fit(X[train], y[train], epochs=args.epochs,
                          validation_data=(X[test], y[test]), verbose=not args.quiet)
    seconds = time.perf_counter() - start
    result = trainer.evaluate(X[test], y[test])
    print(f"held-out accuracy {result['accuracy']:.2%}  loss {result['loss']:.4f}")
    print(f"training speed {np.median(history.samples_per_second):,.0f} samples/s (median epoch); "
          f"{args.epochs} epochs took {sum(history.time):.3f} s, {seconds:.3f} s with validation "
          f"and start-up")
    return 0


def _info(args):
    import cprop
    cprop.show_config()
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        print("    (install threadpoolctl to list every thread pool)")
        return 0
    for pool in threadpool_info():
        print(f"    pool: {pool.get('internal_api')} {pool.get('version')} "
              f"threads={pool.get('num_threads')} {pool.get('filepath')}")
    return 0


def _hidden_sizes(text):
    try:
        sizes = [int(h) for h in text.split(",") if h.strip()] if text.strip() else []
    except ValueError:
        raise UsageError(f"--hidden must be comma-separated integers like 128,64, got {text!r}") from None
    if any(h <= 0 for h in sizes):
        raise UsageError(f"--hidden sizes must be positive, got {text!r}")
    return sizes


def _train(args):
    import numpy as np
    import cprop
    from ._cli_data import read_table

    X, y, names = read_table(args.data, args.target)
    if y is None:
        raise UsageError("train needs a target: --target COLUMN (CSV) or an array 'y' (NPZ)")
    X = np.asarray(X, dtype=np.float64)
    cprop._validation.check_finite(X, "the features")
    y = np.asarray(y)
    loss = args.loss
    if loss == "auto":
        integral = y.dtype.kind in "iub" or (y.dtype.kind == "f" and np.all(y == np.round(y)))
        loss = "cross_entropy" if y.ndim == 1 and integral and len(np.unique(y)) <= 100 else "mse"
    extra = {"features": names}
    if loss == "cross_entropy":
        classes, y = np.unique(y, return_inverse=True)
        if classes.dtype.kind == "f" and np.all(classes == np.round(classes)):
            classes = classes.astype(np.int64)
        if len(classes) < 2:
            raise UsageError("the target has a single class; nothing to learn")
        extra["classes"] = classes.tolist()
        n_out = len(classes)
    else:
        n_out = 1 if y.ndim == 1 else y.shape[1]
    # standardise the features; the scaling is saved with the model for predict
    mean, std = X.mean(axis=0), X.std(axis=0)
    std[std == 0] = 1.0
    extra["mean"], extra["std"] = mean.tolist(), std.tolist()
    X = (X - mean) / std

    sizes = [X.shape[1]] + _hidden_sizes(args.hidden) + [n_out]
    layers = [cprop.Dense(sizes[i], sizes[i + 1], args.activation if i < len(sizes) - 2 else None)
              for i in range(len(sizes) - 1)]
    net = cprop.Sequential(layers, dtype=args.dtype, seed=args.seed)
    optimizer = (cprop.SGD(lr=args.lr or 0.01, momentum=0.9) if args.optimizer == "sgd"
                 else cprop.Adam(lr=args.lr or 0.001))
    trainer = cprop.Trainer(net, loss, optimizer, batch_size=args.batch_size, seed=args.seed,
                            n_threads=args.threads)
    trainer.extra = extra
    print(f"training {'-'.join(map(str, sizes))} ({args.activation}) on {X.shape[0]} samples, loss {loss}")
    trainer.fit(X, y, epochs=args.epochs, validation_split=args.validation_split or None,
                verbose=not args.quiet)
    trainer.save(args.out)
    result = trainer.evaluate(X, y)
    print(f"training-set {', '.join(f'{k} {v:.4f}' for k, v in result.items())}; saved {args.out}")
    return 0


def _predict(args):
    import numpy as np
    import cprop
    from ._cli_data import read_table

    trainer = cprop.Trainer.load(args.model)
    extra = trainer.extra
    X, _, names = read_table(args.data, args.target)
    features = extra.get("features")
    if features is not None and X.shape[1] != len(features):
        if args.target is None and X.shape[1] == len(features) + 1:
            raise UsageError("the data has one column more than the model's features: "
                             "name the target column to drop with --target")
        raise UsageError(f"the model expects {len(features)} features, the data has {X.shape[1]}")
    X = np.asarray(X, dtype=np.float64)
    if "mean" in extra:
        X = (X - np.asarray(extra["mean"])) / np.asarray(extra["std"])
    pred = trainer.predict(X)
    if "classes" in extra:
        pred = np.asarray(extra["classes"])[pred]
    lines = [" ".join(str(v) for v in np.atleast_1d(row)) for row in pred]
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {len(lines)} predictions to {args.out}")
    else:
        print("\n".join(lines))
    return 0


def _export(args):
    """The network of a saved model as an ONNX file; a `cprop train` model's feature
    scaling goes into the graph, so it takes the raw features as `cprop predict` does."""
    from . import io as _io
    from . import onnx as cprop_onnx
    from .network import network_from_meta

    meta, arrays = _io.load_archive(args.model, kind=("network", "trainer"))
    net = network_from_meta(meta, arrays, args.model)
    extra = meta.get("extra") if isinstance(meta.get("extra"), dict) else {}
    scaling = (extra["mean"], extra["std"]) if "mean" in extra and "std" in extra else None
    head = None if args.head == "none" else args.head
    cprop_onnx.export(net, args.out, head=head, opset=args.opset, standardize=scaling)
    output = cprop_onnx.LOGITS if head is None else cprop_onnx.PROBABILITIES
    dtype = net.architecture()["dtype"]
    notes = ["standardises the features as `cprop predict` does"] if scaling else []
    if "classes" in extra:
        notes.append(f"columns are the classes {' '.join(map(str, extra['classes']))}")
    print(f"wrote {args.out}: input {cprop_onnx.INPUT} (N, {net.n_inputs}) {dtype} -> "
          f"{output} (N, {net.n_outputs})" + "".join(f"; {note}" for note in notes))
    return 0


def _bench(args):
    from . import bench
    return bench.run(args)


def build_parser():
    parser = argparse.ArgumentParser(prog="cprop", description="Fast CPU training of multi-layer perceptrons.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="train on the bundled digits; print accuracy and speed",
                       description="Train a 64-H-10 relu network on the bundled UCI digits, "
                                   "print held-out accuracy and samples/s.")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    p.add_argument("--hidden", type=int, default=64, help="hidden width H (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    p.set_defaults(func=_demo)

    p = sub.add_parser("train", help="train a network on a CSV or NPZ file and save it",
                       description="Train an MLP on tabular data (CSV with a header row, or NPZ with "
                                   "arrays X and y). Features are standardised; the model file keeps "
                                   "the scaling and class names for `cprop predict`.")
    p.add_argument("data", help="CSV (header row; numbers only) or NPZ file")
    p.add_argument("--target", help="target column name or index (CSV), or array name (NPZ, default y)")
    p.add_argument("--hidden", default="64", help="hidden layer widths, comma-separated (default 64)")
    p.add_argument("--activation", default="relu", choices=["relu", "leaky_relu", "tanh", "sigmoid", "identity"])
    p.add_argument("--loss", default="auto", choices=["auto", "cross_entropy", "mse", "binary_cross_entropy"],
                   help="default: cross_entropy for integer targets with few values, mse otherwise")
    p.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    p.add_argument("--batch-size", type=int, default=32, help="minibatch size (default 32)")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"],
                   help="sgd (momentum 0.9, lr 0.01) or adam (lr 0.001)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default per optimizer)")
    p.add_argument("--validation-split", type=float, default=0.0, help="fraction held out to report val_loss")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="model.npz", help="where to save the trained model (default model.npz)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_train)

    p = sub.add_parser("predict", help="predict with a model saved by `cprop train`",
                       description="Print (or write) one prediction per row of DATA.")
    p.add_argument("model", help="a model file written by `cprop train`")
    p.add_argument("data", help="CSV (header row) or NPZ file with the same feature columns")
    p.add_argument("--target", help="a target column to ignore, if DATA has one")
    p.add_argument("--out", help="write predictions here instead of printing them")
    p.set_defaults(func=_predict)

    p = sub.add_parser("export", help="write a saved model as an ONNX file (needs cprop[onnx])",
                       description="Write the network of a model saved by `cprop train` (feature scaling "
                                   "included) or Sequential.save as an ONNX model, for ONNX Runtime.")
    p.add_argument("model", help="a model file written by `cprop train` or Sequential.save")
    p.add_argument("out", help="the ONNX file to write")
    p.add_argument("--head", default="none", choices=["none", "softmax", "sigmoid"],
                   help="append softmax or sigmoid: output probabilities instead of logits (default none)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset version (default: cprop.onnx.DEFAULT_OPSET)")
    p.set_defaults(func=_export)

    p = sub.add_parser("info", help="version, OpenMP, SIMD build, threads and BLAS in use",
                       description="Show how cprop was built and which threads and BLAS it uses.")
    p.set_defaults(func=_info)

    p = sub.add_parser("bench", help="compare training speed against PyTorch, JAX, scikit-learn and NumPy",
                       description="Time one-epoch training of the standard workloads for cprop and "
                                   "every installed peer, in alternation, and print median samples/s.")
    try:
        from . import bench
        bench.add_arguments(p)
    except ImportError:
        pass
    p.set_defaults(func=_bench)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except (UsageError, ValueError, TypeError, ImportError, OSError) as exc:
        print(f"cprop {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cprop {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
