# The CPU base image for tests, built by scripts/build-base with nothing pulled: the imported
# debootstrap root (editstack/bookworm:local), a venv at /opt/venv with CPU torch, and the wheel house
# at /wheels. The build context is .wheelhouse/.
#
# Wheel-house convention: the ENV below (PIP_NO_INDEX, PIP_FIND_LINKS) is inherited by every image
# built FROM this one, so the service Dockerfiles carry no test-only lines: their `pip install`
# resolves from /wheels here and from the index on the official PyTorch images in production.
ARG BOOTSTRAP_IMAGE=editstack/bookworm:local

FROM ${BOOTSTRAP_IMAGE} AS venv
# torch alone first, without its dependencies: this 700 MB layer stays cached when other wheels change.
COPY torch-*.whl /tmp/torch/
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install -q --no-index --no-deps --no-cache-dir /tmp/torch/*.whl \
 && rm -rf /tmp/torch
COPY . /wheels
# torch's dependencies; then drop torch's wheel, which the venv already holds, from what /wheels keeps.
RUN /opt/venv/bin/pip install -q --no-index --find-links /wheels --no-cache-dir torch \
 && /opt/venv/bin/pip check \
 && rm /wheels/torch-*.whl

FROM ${BOOTSTRAP_IMAGE}
COPY --from=venv /opt/venv /opt/venv
COPY --from=venv /wheels /wheels
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PIP_NO_INDEX=1 \
    PIP_FIND_LINKS=/wheels \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
CMD ["python3"]
