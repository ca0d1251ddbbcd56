# gears-dist on the official Ray GPU image, with the Ray (2.60.0) and Python (3.11) that
# pyproject.toml pins; the cluster manifests (cluster/k8s/) run this image.
#   docker build -t registry.example.com/gears-dist:0.1.0-ray2.60.0-py311-gpu .
#   docker run --rm --gpus all registry.example.com/gears-dist:0.1.0-ray2.60.0-py311-gpu train --help
# Tag convention: <project version>-ray<Ray version>-py<XY>-gpu (tests/test_shell_and_docker.py checks it).
FROM rayproject/ray:2.60.0-py311-gpu

# The base image's unprivileged user "ray" (uid 1000, group users = 100) owns its Python environment; numeric so
# that Kubernetes runAsNonRoot can verify it.
USER 1000:100
WORKDIR /home/ray/gears-dist

# DeepSpeed compiles its CUDA ops on first use on the GPU node, not at install time.
ENV DS_BUILD_OPS=0 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies in their own layer, at the exact versions tested together (cluster/constraints.txt).
# torch from PyPI is the CUDA build on Linux; the pin keeps it the tested release.
COPY --chown=ray:users cluster/constraints.txt cluster/constraints.txt
RUN pip install --no-cache-dir --constraint cluster/constraints.txt torch==2.13.0

COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users gears_dist gears_dist
# configs/ sits in the working directory so that `--config configs/X.yaml` works in every RayJob.
COPY --chown=ray:users configs configs
RUN pip install --no-cache-dir --constraint cluster/constraints.txt . \
    && gears-dist --help > /dev/null

ENTRYPOINT ["gears-dist"]
CMD ["--help"]
