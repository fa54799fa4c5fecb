// Part of qlass (see envs/sciworld_hash.py): gives ScienceWorld's EnvObject a hash code derived from
// its object id, so the simulator's hash sets iterate in a reproducible order without making every
// identity hash code constant. Usage: java PatchEnvObjectHash IN.class OUT.class
// Built with the JDK's own copy of ASM (javac/java --add-exports java.base/jdk.internal.org.objectweb.asm=ALL-UNNAMED).

import java.nio.file.Files;
import java.nio.file.Path;
import jdk.internal.org.objectweb.asm.ClassReader;
import jdk.internal.org.objectweb.asm.ClassVisitor;
import jdk.internal.org.objectweb.asm.ClassWriter;
import jdk.internal.org.objectweb.asm.FieldVisitor;
import jdk.internal.org.objectweb.asm.MethodVisitor;
import jdk.internal.org.objectweb.asm.Opcodes;

public class PatchEnvObjectHash {
    public static void main(String[] args) throws Exception {
        ClassReader reader = new ClassReader(Files.readAllBytes(Path.of(args[0])));
        String owner = reader.getClassName();
        ClassWriter writer = new ClassWriter(reader, ClassWriter.COMPUTE_MAXS);
        boolean[] found = {false, false};  // a long uuid field; an own hashCode()
        reader.accept(new ClassVisitor(Opcodes.ASM8, writer) {
            @Override
            public FieldVisitor visitField(int access, String name, String desc, String sig, Object value) {
                found[0] |= name.equals("uuid") && desc.equals("J");
                return super.visitField(access, name, desc, sig, value);
            }

            @Override
            public MethodVisitor visitMethod(int access, String name, String desc, String sig, String[] exceptions) {
                found[1] |= name.equals("hashCode") && desc.equals("()I");
                return super.visitMethod(access, name, desc, sig, exceptions);
            }

            @Override
            public void visitEnd() {
                if (!found[0] || found[1]) {
                    throw new IllegalStateException(owner + " has no long uuid field or already defines hashCode()");
                }
                MethodVisitor mv = super.visitMethod(Opcodes.ACC_PUBLIC, "hashCode", "()I", null, null);
                mv.visitCode();
                mv.visitVarInsn(Opcodes.ALOAD, 0);
                mv.visitFieldInsn(Opcodes.GETFIELD, owner, "uuid", "J");
                mv.visitMethodInsn(Opcodes.INVOKESTATIC, "java/lang/Long", "hashCode", "(J)I", false);
                mv.visitInsn(Opcodes.IRETURN);
                mv.visitMaxs(0, 0);
                mv.visitEnd();
                super.visitEnd();
            }
        }, 0);
        Files.createDirectories(Path.of(args[1]).toAbsolutePath().getParent());
        Files.write(Path.of(args[1]), writer.toByteArray());
    }
}
