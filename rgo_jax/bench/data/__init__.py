"""Data: loaders for standard on-disk formats, opt-in verified download, task streams.

Loaders return a :class:`Dataset` (float32 NHWC images in ``[0, 1]``, int32 labels) and
never touch the network; :func:`download` fetches official files only when called. Task
streams (:func:`permuted`, :func:`rotated`, :func:`class_split`, :func:`multi_dataset`)
build continual-learning tasks lazily with global labels into one shared head.

Example:
  >>> from rgo_jax.bench import data
  >>> stream = data.class_split(data.load_digits(), num_tasks=5, seed=0)
  >>> len(stream), stream.num_classes, len(stream.task_classes(0))
  (5, 10, 2)
"""

from rgo_jax.bench.data._dataset import Dataset as Dataset
from rgo_jax.bench.data._dataset import stratified_split as stratified_split
from rgo_jax.bench.data._download import DOWNLOADS as DOWNLOADS
from rgo_jax.bench.data._download import ChecksumError as ChecksumError
from rgo_jax.bench.data._download import download as download
from rgo_jax.bench.data._download import sha256_file as sha256_file
from rgo_jax.bench.data._idx import read_idx as read_idx
from rgo_jax.bench.data._image import resize_images as resize_images
from rgo_jax.bench.data._image import rotate_images as rotate_images
from rgo_jax.bench.data._loaders import DATASET_NAMES as DATASET_NAMES
from rgo_jax.bench.data._loaders import default_data_dir as default_data_dir
from rgo_jax.bench.data._loaders import load_cifar10 as load_cifar10
from rgo_jax.bench.data._loaders import load_cifar100 as load_cifar100
from rgo_jax.bench.data._loaders import load_dataset as load_dataset
from rgo_jax.bench.data._loaders import load_digits as load_digits
from rgo_jax.bench.data._loaders import load_fashion_mnist as load_fashion_mnist
from rgo_jax.bench.data._loaders import load_miniimagenet as load_miniimagenet
from rgo_jax.bench.data._loaders import load_mnist as load_mnist
from rgo_jax.bench.data._loaders import load_notmnist as load_notmnist
from rgo_jax.bench.data._loaders import load_npz as load_npz
from rgo_jax.bench.data._pickle import UnsafePickleError as UnsafePickleError
from rgo_jax.bench.data._pickle import load_pickle as load_pickle
from rgo_jax.bench.data._streams import SUBSAMPLES as SUBSAMPLES
from rgo_jax.bench.data._streams import Task as Task
from rgo_jax.bench.data._streams import TaskStream as TaskStream
from rgo_jax.bench.data._streams import check_subsample as check_subsample
from rgo_jax.bench.data._streams import class_split as class_split
from rgo_jax.bench.data._streams import multi_dataset as multi_dataset
from rgo_jax.bench.data._streams import permuted as permuted
from rgo_jax.bench.data._streams import pixel_permutation as pixel_permutation
from rgo_jax.bench.data._streams import rotated as rotated
