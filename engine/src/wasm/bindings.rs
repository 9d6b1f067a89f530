//! Host bindings for the `job` world of `wit/kiln.wit`.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "job",
    imports: { default: async | trappable },
    exports: { default: async },
});
