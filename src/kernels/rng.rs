//! TEMPORARY stand-in (being replaced by the fast Philox module).
const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for _ in 0..10 {
        let p0 = (M0 as u64) * (c[0] as u64);
        let p1 = (M1 as u64) * (c[2] as u64);
        c = [
            ((p1 >> 32) as u32) ^ c[1] ^ k[0],
            p1 as u32,
            ((p0 >> 32) as u32) ^ c[3] ^ k[1],
            p0 as u32,
        ];
        k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
    }
    c
}

pub fn fill_normal(seed: u64, stream: u64, start: u64, out: &mut [f32]) {
    let key = [seed as u32, (seed >> 32) as u32];
    for (j, o) in out.iter_mut().enumerate() {
        let i = start + j as u64;
        let b = i / 4;
        let r = philox4x32_10(
            [
                b as u32,
                (b >> 32) as u32,
                stream as u32,
                (stream >> 32) as u32,
            ],
            key,
        );
        let lane = (i % 4) as usize;
        let (a, c) = if lane < 2 { (r[0], r[1]) } else { (r[2], r[3]) };
        let u1 = ((a >> 8) + 1) as f64 * (1.0 / 16_777_216.0);
        let u2 = (c >> 8) as f64 * (1.0 / 16_777_216.0);
        let rad = (-2.0 * u1.ln()).sqrt();
        let th = 2.0 * std::f64::consts::PI * u2;
        *o = (if lane % 2 == 0 {
            rad * th.cos()
        } else {
            rad * th.sin()
        }) as f32;
    }
}
