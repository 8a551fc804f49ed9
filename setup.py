"""Build of mfld's one compiled extension (everything else is in pyproject.toml).

``mfld/csrc/tanh_sums.cc`` (thin features) and ``mfld/csrc/tanh_blocks.cc`` (wide features)
hold XLA FFI custom calls for the drift of tanh networks (:mod:`mfld.kernels`). It needs a
C++17 compiler and nothing else: the XLA FFI headers it includes are vendored under
``mfld/csrc/xla`` (Apache-2.0, from jaxlib 0.10.2).
The extension is optional: if it cannot be compiled the install goes on, and mfld takes its
XLA path everywhere (``mfld.kernels.status()`` says why).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mfld._tanh_sums",
            sources=["mfld/csrc/tanh_sums.cc", "mfld/csrc/tanh_blocks.cc"],
            include_dirs=["mfld/csrc"],
            language="c++",
            # FMA contraction on (ISO -std=c++17 turns it off); the warnings are the vendored headers'
            extra_compile_args=["-O3", "-std=c++17", "-ffp-contract=fast", "-Wno-psabi", "-Wno-attributes",
                                "-Wno-return-type"],
            optional=True,
        )
    ]
)
