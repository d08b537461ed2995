"""Networks: the depth + confidence network, the pose network, and the LiDAR-trained confidence net."""

from distill_depth.models.depth_net import DepthNet, depth_to_disp, disp_to_depth
from distill_depth.models.error_confidence import ErrorConfidenceNet
from distill_depth.models.encoder import WeightsError, create_encoder, read_state_dict
from distill_depth.models.pose_net import PoseNet

__all__ = ["DepthNet", "ErrorConfidenceNet", "PoseNet", "WeightsError", "create_encoder", "depth_to_disp", "disp_to_depth", "read_state_dict"]
