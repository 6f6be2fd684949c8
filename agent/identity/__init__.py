"""Who a cgroup or a network namespace belongs to: cgroup trees and ids, pod names from the
Kubernetes API, network namespaces and their pods."""
