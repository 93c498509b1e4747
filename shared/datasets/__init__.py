"""Training datasets: validated at submit time, loaded and sharded on workers.

A :class:`DatasetSpec` names a dataset and its options. The scheduler calls :func:`validate` when a job
is submitted, so that everything knowable (unknown names or options, missing files, wrong layouts, data
that does not fit the architecture's input) fails then with :class:`~shared.errors.InvalidArgument`
naming the field; it returns a :class:`DatasetInfo` whose ``fingerprint`` goes into the model's lineage.
Workers call :func:`load` (passing that fingerprint back) and :meth:`Dataset.shard` to get their share.

Datasets (options and their defaults):

``digits``
    scikit-learn's 1797 8x8 handwritten digits, ten classes, shipped with scikit-learn (no download).
    No options. Grey levels are scaled to [0, 1]. For ``cnn`` ``x`` is ``[-1, 1, 8, 8]``; for ``mlp``
    ``[-1, 64]`` (``in_features`` must be 64).
``synthetic-classification``
    Gaussian blobs for ``mlp`` (or ``cnn``, when ``num_features`` is ``C * size * size``): ``num_samples``
    (1000), ``num_features`` (16), ``num_classes`` (2), ``cluster_std`` (0.5), ``seed`` (0).
``synthetic-sequences``
    Random token sequences for ``lstm-classifier`` and ``transformer-classifier`` labelled by their
    majority vocabulary band: ``num_samples`` (1000), ``seq_len`` (16), ``vocab_size`` (16),
    ``num_classes`` (2), ``seed`` (0).
``text``
    Byte-level next-token windows for ``decoder-lm``: ``corpus`` (a built-in corpus, ``"all"``,
    ``"proverbs"`` or ``"platform"``; the default) or ``path`` (a UTF-8 text file), ``context`` (window
    length; default and maximum the architecture's ``context``), ``stride`` (default ``context``).
    ``x`` is a window of bytes and ``y`` the same window shifted by one byte, both int64.
``file``
    A user file: ``path`` (required; relative to the service's data directory) and ``format`` (``npz`` or
    ``csv``; by default from the file extension).

User file layouts:

``.npz`` (``numpy.savez``; pickled objects are never loaded)
    Array ``"x"``: numeric samples ``[num_samples, ...]``, e.g. ``[n, features]`` for ``mlp``,
    ``[n, C, H, W]`` or ``[n, H, W]`` for ``cnn``, integer token ids ``[n, length]`` for sequence
    classifiers. Array ``"y"``: integer class labels ``[num_samples]``, each in ``[0, num_classes)``.
    Other arrays are ignored. Features are used as stored (not normalised).
CSV (UTF-8)
    A header row naming the columns, then one row per sample: every column but the last a number (a
    feature, or an integer token id for sequence classifiers), the last column an integer class label.
    Blank lines are skipped. For ``cnn`` a row holds the ``C * H * W`` pixel values in C order.

A user file's fingerprint is the SHA-256 of its bytes (``sha256sum`` prints the same); generated and
built-in data are fingerprinted with :func:`fingerprint_arrays` over their arrays. The spec itself
(options, split seed) is recorded next to the fingerprint, which identifies the content only.
"""

from shared.datasets.api import DATASETS, load, validate
from shared.datasets.fingerprint import fingerprint_arrays, fingerprint_bytes
from shared.datasets.source import MAX_ELEMENTS, MAX_FILE_BYTES
from shared.datasets.spec import Dataset, DatasetInfo, DatasetSpec, OptionValue

__all__ = [
    "DATASETS",
    "MAX_ELEMENTS",
    "MAX_FILE_BYTES",
    "Dataset",
    "DatasetInfo",
    "DatasetSpec",
    "OptionValue",
    "fingerprint_arrays",
    "fingerprint_bytes",
    "load",
    "validate",
]
