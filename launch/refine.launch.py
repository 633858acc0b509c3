"""Start the ``rnnpose_refiner`` node (executable ``refine_node``) and, optionally, rviz2.

On a ROS 2 distribution (Humble, Jazzy, Kilted) after ``colcon build``::

    ros2 launch rnnpose_ros refine.launch.py \\
        image:=/camera/color/image_rect camera_info:=/camera/color/camera_info \\
        detections:=/detector/detections use_rviz:=true

With a depth image registered to the colour image (``depth:=<topic>`` also sets ``use_depth: true``)::

    ros2 launch rnnpose_ros refine.launch.py image:=/camera/color/image_rect_raw \\
        camera_info:=/camera/color/camera_info detections:=/detector/detections \\
        depth:=/camera/aligned_depth_to_color/image_raw

Pip-only installs have no ``launch`` package; the equivalent there is::

    refine_node --ros-args --params-file config/refine.yaml \\
        -r image:=/camera/color/image_rect -r camera_info:=/camera/color/camera_info \\
        -r detections:=/detector/detections \\
        -p use_depth:=true -r depth:=/camera/aligned_depth_to_color/image_raw   # with depth

Topics are remapped here rather than passed as parameters (image_pipeline convention); every node
parameter lives in the params file (``config/refine.yaml`` documents each one), except ``use_sim_time``
(ROS' own parameter, on for bag replay: ``ros2 bag play --clock`` publishes ``/clock``). rviz2 starts in
the node's namespace with a copy of the rviz configuration whose ``rnnpose_refiner/...`` topics are
made absolute under it (:mod:`rnnpose_ros.rviz_config`), so it shows this node's output whatever the
namespace.
"""

from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

from rnnpose_ros.rviz_config import write_namespaced_rviz_config

PACKAGE = "rnnpose_ros"


def generate_launch_description() -> LaunchDescription:
    share = FindPackageShare(PACKAGE)
    arguments = [
        DeclareLaunchArgument(
            "params_file",
            default_value=PathJoinSubstitution([share, "config", "refine.yaml"]),
            description="Parameters of the node (YAML with /**: ros__parameters:).",
        ),
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node."),
        DeclareLaunchArgument(
            "image", default_value="image", description="Rectified colour image topic (sensor_msgs/Image)."
        ),
        DeclareLaunchArgument(
            "camera_info",
            default_value="camera_info",
            description="Camera info topic of that image (sensor_msgs/CameraInfo).",
        ),
        DeclareLaunchArgument(
            "detections",
            default_value="detections",
            description="Initial poses from the detector (vision_msgs/Detection3DArray, image header).",
        ),
        DeclareLaunchArgument(
            "depth",
            default_value="",
            description="Depth image registered to the colour image (sensor_msgs/Image, 16UC1 mm or 32FC1 m, "
            "e.g. /camera/aligned_depth_to_color/image_raw); a topic here also sets use_depth: true. "
            "Empty = use_depth as the params file says (topic 'depth').",
        ),
        DeclareLaunchArgument("use_rviz", default_value="false", description="Also start rviz2."),
        DeclareLaunchArgument(
            "rviz_config",
            default_value=PathJoinSubstitution([share, "config", "rnnpose.rviz"]),
            description="rviz2 configuration (meshes, TF and debug overlay of rnnpose_refiner).",
        ),
        DeclareLaunchArgument("log_level", default_value="info", description="Log level of the node."),
        DeclareLaunchArgument(
            "use_sim_time",
            default_value="false",
            description="Use /clock (true when replaying a bag with `ros2 bag play --clock`).",
        ),
    ]
    return LaunchDescription(
        [
            *arguments,
            OpaqueFunction(function=_refiner),
            OpaqueFunction(function=_rviz, condition=IfCondition(LaunchConfiguration("use_rviz"))),
        ]
    )


def _sim_time() -> dict:
    return {"use_sim_time": ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool)}


def _refiner(context: LaunchContext) -> list[Node]:
    """The refiner node; resolved at launch time because a ``depth`` topic adds a parameter."""
    parameters: list = [LaunchConfiguration("params_file"), _sim_time()]
    remappings = [
        ("image", LaunchConfiguration("image")),
        ("camera_info", LaunchConfiguration("camera_info")),
        ("detections", LaunchConfiguration("detections")),
    ]
    depth = LaunchConfiguration("depth").perform(context)
    if depth:
        parameters.append({"use_depth": True})
        remappings.append(("depth", depth))
    return [
        Node(
            package=PACKAGE,
            executable="refine_node",
            name="rnnpose_refiner",
            namespace=LaunchConfiguration("namespace"),
            parameters=parameters,
            remappings=remappings,
            ros_arguments=["--log-level", LaunchConfiguration("log_level")],
            output="screen",
            emulate_tty=True,
        )
    ]


def _rviz(context: LaunchContext) -> list[Node]:
    """rviz2 in the node's namespace, with a copy of the configuration made absolute under it."""
    namespace = LaunchConfiguration("namespace").perform(context)
    config = write_namespaced_rviz_config(LaunchConfiguration("rviz_config").perform(context), namespace)
    return [
        Node(
            package="rviz2",
            executable="rviz2",
            name="rviz2",
            namespace=namespace,
            arguments=["-d", str(config)],
            parameters=[_sim_time()],
            output="screen",
        )
    ]
