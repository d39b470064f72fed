"""Flax linen models behind a pure ``init`` / ``apply`` boundary."""

from hnjax.models.convnet import ConvNet
from hnjax.models.encoder import backbone_names
from hnjax.models.encoder import create_encoder
from hnjax.models.encoder import Encoder
from hnjax.models.encoder import get_model
from hnjax.models.heads import get_head
from hnjax.models.heads import IdentityHead
from hnjax.models.heads import LinearHead
from hnjax.models.heads import MLPHead
from hnjax.models.mlp import MLP
from hnjax.models.norm import shuffle
from hnjax.models.norm import SplitBatchNorm
from hnjax.models.norm import unshuffle
from hnjax.models.resnet import BasicBlock
from hnjax.models.resnet import Bottleneck
from hnjax.models.resnet import ResNet
from hnjax.models.resnet import ResNet18
from hnjax.models.resnet import ResNet18Cifar
from hnjax.models.resnet import ResNet34
from hnjax.models.resnet import ResNet34Cifar
from hnjax.models.resnet import ResNet50
from hnjax.models.resnet import ResNet50Cifar
from hnjax.models.transformer import TextTransformer
from hnjax.models.transformer import VisionTransformer
from hnjax.models.clip import CLIP

__all__ = [
    'BasicBlock',
    'CLIP',
    'Bottleneck',
    'ConvNet',
    'Encoder',
    'IdentityHead',
    'LinearHead',
    'MLP',
    'MLPHead',
    'ResNet',
    'ResNet18',
    'ResNet18Cifar',
    'ResNet34',
    'ResNet34Cifar',
    'ResNet50',
    'ResNet50Cifar',
    'SplitBatchNorm',
    'TextTransformer',
    'VisionTransformer',
    'backbone_names',
    'create_encoder',
    'get_head',
    'get_model',
    'shuffle',
    'unshuffle',
]
