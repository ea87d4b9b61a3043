"""The GradWatch tab for TensorBoard (a dynamic plugin, registered through the
``tensorboard_plugins`` entry point as ``gradwatch.tb_plugin.plugin:GradWatchPlugin``).

Importing :mod:`gradwatch` never imports this package; TensorBoard loads it.
"""
