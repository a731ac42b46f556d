"""A/B of two cprop trees: training epoch and predict_raw samples/s on the bench workloads,
each measurement in its own process, trees alternating. Usage: ab.py TREE_A TREE_B ROUNDS"""
import json
import statistics
import subprocess
import sys

PROBE = r'''
import sys, time, json, numpy as np
sys.path.insert(0, sys.argv[1])
import cprop
assert cprop.__file__.startswith(sys.argv[1]), cprop.__file__
W = {"tiny": ((2, 32, 32, 1), 32, "mse", 100000), "mnist": ((784, 128, 10), 64, "cross_entropy", 20000),
     "deep": ((784, 256, 256, 256, 10), 128, "cross_entropy", 10000),
     "wide": ((784, 1024, 1024, 10), 256, "cross_entropy", 3000)}
out = {}
for name, (sizes, bs, loss, n) in W.items():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], n) if loss == "cross_entropy" else rng.normal(size=(n, 1)).astype(np.float32)
    layers = [cprop.Dense(sizes[i], sizes[i + 1], "relu" if i < len(sizes) - 2 else None)
              for i in range(len(sizes) - 1)]
    net = cprop.Sequential(layers, seed=0)
    tr = cprop.Trainer(net, loss=loss, optimizer=cprop.SGD(lr=0.01, momentum=0.9), batch_size=bs, seed=0)
    tr.fit(X, y, epochs=1)
    t = []
    for _ in range(3):
        s = time.perf_counter(); tr.fit(X, y, epochs=1); t.append(time.perf_counter() - s)
    out[name + "/train"] = n / sorted(t)[1]
    Xi = X[:10000] if n >= 10000 else np.tile(X, (10000 // n + 1, 1))[:10000]
    net.predict_raw(Xi)
    t = []
    for _ in range(5):
        s = time.perf_counter(); net.predict_raw(Xi); t.append(time.perf_counter() - s)
    out[name + "/infer"] = 10000 / sorted(t)[2]
print(json.dumps(out))
'''

a, b, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
res = {a: [], b: []}
for r in range(rounds):
    for tree in ((a, b) if r % 2 == 0 else (b, a)):
        p = subprocess.run([sys.executable, "-c", PROBE, tree], capture_output=True, text=True)
        if p.returncode:
            print(p.stderr[-2000:])
            sys.exit(1)
        res[tree].append(json.loads(p.stdout.strip().splitlines()[-1]))
keys = res[a][0].keys()
print(f"{'case':14s} {'A':>12s} {'B':>12s}  B/A   (medians of {rounds} alternating processes)")
for k in keys:
    ma = statistics.median(x[k] for x in res[a])
    mb = statistics.median(x[k] for x in res[b])
    print(f"{k:14s} {ma:12,.0f} {mb:12,.0f}  {mb / ma:.3f}")
