"""Datasets and the Lightning DataModule every method uses (batch contract: docs/ARCHITECTURE.md)."""

from adtrain.data.base import AnomalyDataModule
from adtrain.data.btad import BTADDataModule
from adtrain.data.dataset import AnomalyDataset, PredictDataset, Sample, load_sample
from adtrain.data.elpv import ElpvDataModule
from adtrain.data.folder import FolderDataModule
from adtrain.data.image_io import read_image, read_mask
from adtrain.data.mpdd import MPDDDataModule
from adtrain.data.mvtec import MVTecDataModule
from adtrain.data.mvtec_3d import MVTec3DDataModule
from adtrain.data.mvtec_ad2 import MVTecAD2DataModule
from adtrain.data.mvtec_loco import MVTecLOCODataModule
from adtrain.data.realiad import RealIADDataModule
from adtrain.data.synthetic import SyntheticDataModule
from adtrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from adtrain.data.visa import VisADataModule

__all__ = [
    "AnomalyDataModule", "AnomalyDataset", "PredictDataset", "Sample", "load_sample",
    "MVTecDataModule", "MPDDDataModule", "BTADDataModule", "MVTecLOCODataModule", "MVTec3DDataModule",
    "MVTecAD2DataModule", "RealIADDataModule", "VisADataModule", "FolderDataModule", "ElpvDataModule",
    "SyntheticDataModule",
    "read_image", "read_mask", "IMAGENET_MEAN", "IMAGENET_STD",
]
