//! A WASI command, not a job: proves that components of the wrong world are refused.
fn main() {
    println!("I am a command, not a Kiln job");
}
