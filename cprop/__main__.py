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
    print(f"{args.epochs} epochs in {seconds:.3f} s: {len(train) * args.epochs / seconds:,.0f} samples/s "
          f"(including validation after each epoch; {np.median(history.samples_per_second):,.0f} "
          f"samples/s in the training loop)")
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

    p = sub.add_parser("info", help="version, OpenMP, threads and BLAS in use",
                       description="Show how cprop was built and which threads and BLAS it uses.")
    p.set_defaults(func=_info)

    p = sub.add_parser("bench", help="compare training speed against PyTorch, scikit-learn and NumPy",
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
    except (UsageError, ValueError, TypeError, FileNotFoundError, OSError) as exc:
        print(f"cprop {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cprop {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
