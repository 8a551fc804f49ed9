"""Train on your own arrays: a notebook never needs a file.

Two noisy interleaved half-moons, labels in {-1, +1}, logistic loss, with a test split.
"""

import numpy as np

import mfld

rng = np.random.default_rng(1)
n = 200
angle = rng.uniform(0, np.pi, n)
label = rng.choice([-1.0, 1.0], n)
x = np.stack([np.cos(angle) + (label < 0), label * np.sin(angle) * 0.8], axis=1)
x += 0.15 * rng.standard_normal(x.shape)
x_train, y_train, x_test, y_test = x[:150], label[:150], x[150:], label[150:]

res = mfld.run(
    {"objective": {"loss": "logistic", "lam": 0.01, "tau": 0.001},
     "model": {"n_particles": 1000},
     "dynamics": {"eta": 0.2, "steps": 400},
     "record": {"every": 50, "certify_every": 0, "optimum": False}},
    x=x_train, y=y_train, x_test=x_test, y_test=y_test,
    out="runs/own-data", overwrite=True, progress=False,
)
final = res.summary["final"]
print(f"train accuracy {final['accuracy']:.3f}, test accuracy {final['test_accuracy']:.3f}")
