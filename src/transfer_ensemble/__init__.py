"""transfer_ensemble: frozen ImageNet backbones + a K-fold x 2-view softmax-head ensemble.

Importing the package is cheap: TensorFlow is imported only by the modules that run a model.
"""

__version__ = "0.1.0"
