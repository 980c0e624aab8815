"""Fine-tuning methods. Importing this package registers every method; this import list is the only list of them."""

from sparseft.methods.base import (Method, MethodConfig, MethodContext, build_method, check_against_config,
                                   method_class, method_names, register)

from sparseft.methods import full, hift, lamda, lora, s2ft, squarehead  # noqa: E402,F401  (registration)

__all__ = ["Method", "MethodConfig", "MethodContext", "build_method", "check_against_config", "method_class",
           "method_names", "register"]
