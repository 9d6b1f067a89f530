//! Host bindings for the worlds of `wit/kiln.wit`: `job` here, `policy` and `reporter`
//! in their own modules (each world's bindings bring their own copy of the shared types).

wasmtime::component::bindgen!({
    path: "../wit",
    world: "job",
    imports: { default: async | trappable },
    exports: { default: async },
});

/// The `policy` world: pure, no imports of its own.
pub(crate) mod policy {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "policy",
        exports: { default: async },
    });
}

/// The `reporter` world: WASI and wasi:http come from wasmtime's own crates.
pub(crate) mod reporter {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "reporter",
        exports: { default: async },
    });
}
