"""One installable distribution of the pipeline, transforms, schemas and views packages.

It is what `--setup_file ./setup.py` ships to Dataflow workers; the dependency pins
come from pipeline/versions.py, the one place that holds them.
"""

import runpy
import pathlib

import setuptools

HERE = pathlib.Path(__file__).resolve().parent
versions = runpy.run_path(str(HERE / 'pipeline' / 'versions.py'))

setuptools.setup(
    name='beam-image-embeddings',
    version='0.1.0',
    description='Batch image embeddings with TF Hub MobileNets on Apache Beam, '
                'Parquet outputs and a FAISS index',
    python_requires='>=3.10',
    packages=['pipeline', 'transforms', 'schemas', 'views'],
    py_modules=['run_pipeline', 'query_index'],
    install_requires=versions['requirements'](),
    extras_require={'test': ['pytest', 'pytest-xdist', 'hypothesis']},
)
