"""Data: built-in offline sets, torchvision / ImageFolder / array-file adapters, and tasks."""

from .builtin import load_mnist, load_sklearn_digits
from .dataset import ImageDataset
from .dsprites import LATENT_NAMES, SHAPES, render_dsprites
from .files import load_array_file
from .folder import load_image_folder
from .sources import load_dataset
from .tasks import Split, Task, get_task, register_task, stratified_split, task_names
from .torchvision_sets import load_torchvision, torchvision_names

__all__ = [
    "LATENT_NAMES",
    "SHAPES",
    "ImageDataset",
    "Split",
    "Task",
    "get_task",
    "load_array_file",
    "load_dataset",
    "load_image_folder",
    "load_mnist",
    "load_sklearn_digits",
    "load_torchvision",
    "register_task",
    "render_dsprites",
    "stratified_split",
    "task_names",
    "torchvision_names",
]
