"""The benchmark harness: the worker against a bare aio-pika consumer, on the same load.

``python -m bench`` (``make bench``) runs every scenario in one invocation and prints
commands/s as ratios to the ceiling measured in that same invocation, because the machine
(and its RabbitMQ) is shared and absolute figures are noisy.
"""
