"""The five methods, each as mechmem interventions."""
