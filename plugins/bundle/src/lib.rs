//! The guest plugins shipped with Kiln, compiled from `plugins/` for wasm32-wasip2 by
//! this crate's build script and embedded as bytes.
//!
//! Configs name them as `bundled:<name>`. The hostile ones (and `not-a-job`, a WASI
//! command rather than a job) exist so that tests can prove the sandbox holds.

include!(concat!(env!("OUT_DIR"), "/bundled.rs"));

/// The component bytes of a bundled plugin.
pub fn get(name: &str) -> Option<&'static [u8]> {
    BUNDLED
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, bytes)| *bytes)
}

/// The names of every bundled plugin.
pub fn names() -> impl Iterator<Item = &'static str> {
    BUNDLED.iter().map(|(name, _)| *name)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_bundled_plugin_is_a_component() {
        for (name, bytes) in super::BUNDLED {
            // A component starts with "\0asm", version 0x0d and layer 1.
            assert_eq!(
                &bytes[..8],
                b"\0asm\x0d\x00\x01\x00",
                "{name} is not a component"
            );
        }
        assert!(super::get("echo").is_some() && super::get("nope").is_none());
    }
}
