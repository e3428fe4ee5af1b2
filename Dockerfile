# Worker image for Dataflow's --sdk_container_image: Beam's own SDK image of the launcher's
# Beam and Python versions, with this project and its pinned dependencies installed, so
# that workers start without running pip. Build it with scripts/build_container.sh, which
# passes both versions from pipeline/versions.py (the one place that holds the pins).
ARG BEAM_VERSION
ARG PYTHON_VERSION
FROM apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION}

WORKDIR /opt/beam-image-embeddings
COPY setup.py run_pipeline.py query_index.py ./
COPY pipeline/ pipeline/
COPY transforms/ transforms/
COPY schemas/ schemas/
COPY views/ views/
# A non-editable install, then a check from outside the source folder that the image holds
# exactly the pinned Beam, TensorFlow and protobuf: a mismatch fails the build, not the job.
RUN pip install --no-cache-dir . \
    && cd / && python -m pipeline.versions check
# The base image's entry point (/opt/apache/beam/boot) stays: Dataflow starts workers with it.
