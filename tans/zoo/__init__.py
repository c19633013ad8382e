"""The zoo stage: supernets, their subnets, training and measuring them, and the zoo on disk.

- ``supernets``: the Once-for-All MobileNetV3 supernet families, loading their weights.
- ``subnets``: subnet architectures (sampling, canonical form, stable ids).
- ``elastic``: sandwich-rule training of a supernet (single process or one DDP worker).
- ``small_maps``: depthwise kernels cropped to the maps they see, channels-last (CPU speed).
- ``measure``: a subnet's zoo row (accuracy, parameters, FLOPs, functional embedding).
- ``store``: the model zoo on disk (Parquet parts per task, ``zoo.json``, stats).
"""

from tans.zoo import ofa_loader_stub

ofa_loader_stub.install()  # before any module here imports OFA: see that module
